"""Entry point of a parallel-export worker process (see :mod:`copystream.pool`)."""

import sys

from .pool import worker_main

sys.exit(worker_main(sys.argv[1:]))
