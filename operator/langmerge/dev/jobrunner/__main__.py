"""``python -m langmerge.dev.jobrunner``: the local Job runner (as ``langmerge jobrunner``)."""

import sys

from langmerge.dev.jobrunner.cli import main

sys.exit(main())
