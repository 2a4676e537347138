"""``python -m d2f_app …`` runs the ``d2f`` command line."""

import sys

from .cli import main

sys.exit(main())
