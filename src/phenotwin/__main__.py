"""`python -m phenotwin ...`, which is also how `accelerate launch -m phenotwin train ...` starts it."""

import sys

from phenotwin.cli import main

sys.exit(main())
