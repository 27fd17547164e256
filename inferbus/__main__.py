"""``python -m inferbus`` is the ``inferbus`` command."""

import sys

from inferbus.cli import main

sys.exit(main())
