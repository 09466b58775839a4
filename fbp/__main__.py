"""``python -m fbp ...`` is the ``fbp`` command."""

from fbp.run.cli import main

raise SystemExit(main())
