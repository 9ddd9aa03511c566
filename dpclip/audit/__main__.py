"""``python -m dpclip.audit``: see :func:`dpclip.audit.cli.main` (exit status 1 on a violation)."""

import sys

from .cli import main

sys.exit(main())
