"""``python -m anonproxy`` runs the command-line interface."""

from anonproxy.cli import main

raise SystemExit(main())
