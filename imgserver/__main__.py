"""``python -m imgserver``."""

import sys

from imgserver.cli import main

sys.exit(main())
