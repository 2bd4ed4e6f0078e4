"""Entry point of a bulk-job worker process (see :mod:`copystream.bulk.worker`)."""

import sys

from .bulk.worker import worker_main

sys.exit(worker_main(sys.argv[1:]))
