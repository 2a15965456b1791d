"""``python -m p3s ...`` runs the P3S command line (:func:`p3s_core.cli.main`)."""
from p3s_core.cli import main

raise SystemExit(main())
