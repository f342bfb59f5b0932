"""``python -m langmerge_trainer.merge CONFIG.yaml OUT [--dry-run] [--device ...]``."""

from __future__ import annotations

import sys

from langmerge_trainer.merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
