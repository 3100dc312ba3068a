"""``python -m anonproxy`` runs the command-line interface.

Nothing is imported at module level: each child process of the service (de-identification
workers, forwarding senders, acceptor processes; see :mod:`anonproxy.processes`) imports this
module again as its main module, and needs none of the command line's imports (each would
cost it memory and time).
"""

if __name__ == "__main__":
    from anonproxy.cli import main

    raise SystemExit(main())
