"""``python -m imgserver``."""

import os
import sys

# ``python -m`` puts the folder it is started from first on the path. By now this package is
# imported (its own modules are found through it); nothing else may come from that folder,
# whatever it holds (a cv2.py, a numpy/), as the installed command already guarantees.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from imgserver.cli import main  # noqa: E402 (after the path is put right)

sys.exit(main())
