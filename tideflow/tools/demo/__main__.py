"""``python -m tideflow.tools.demo``: the same as ``tideflow demo``."""

import sys

from tideflow.tools.demo import main

sys.exit(main())
