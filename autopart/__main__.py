"""``python -m autopart`` is the ``autopart`` command."""
from autopart.cli import main

raise SystemExit(main())
