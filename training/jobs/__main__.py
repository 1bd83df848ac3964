"""Entry point for `python -m training.jobs`."""

import sys

from training.jobs.cli import main

sys.exit(main())
