"""``python -m difftune`` runs the command-line interface."""

from difftune.cli import main

raise SystemExit(main())
