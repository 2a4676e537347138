"""``python -m d2f_host run WORKFLOW.json …`` is ``d2f run``: the form ``torchrun -m d2f_host run`` starts on each rank."""

import sys

from d2f_app.cli import main

sys.exit(main())
