"""``python -m torchdora <command>``: the same as the ``torchdora`` console script."""

from torchdora.app.cli import main

raise SystemExit(main())
