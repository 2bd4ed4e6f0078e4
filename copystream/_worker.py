"""Entry point of a parallel-export worker process (see :mod:`copystream.workers`)."""

import sys

from .workers import worker_main

sys.exit(worker_main(sys.argv[1:]))
