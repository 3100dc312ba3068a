"""``python -m anonproxy`` runs the command-line interface."""

from anonproxy.cli import main

if __name__ == "__main__":  # not when a worker process re-imports the main module (spawn)
    raise SystemExit(main())
