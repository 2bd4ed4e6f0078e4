"""The one entry point of worker processes, for key ranges and bulk tables (see pool.py)."""

import sys

from .pool import worker_main

sys.exit(worker_main(sys.argv[1:]))
