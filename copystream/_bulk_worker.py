"""Entry point of a bulk-job worker process (see :mod:`copystream.bulk`)."""

import sys

from .bulk import worker_main

sys.exit(worker_main(sys.argv[1:]))
