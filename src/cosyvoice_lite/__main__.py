"""``python -m cosyvoice_lite``: the ``cosyvoice-lite`` command."""

import sys

from .cli import main

sys.exit(main())
