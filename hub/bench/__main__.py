"""`python -m hub.bench ...`: how the benchmark starts its client processes (`--client`)."""

import sys

from hub.bench.cli import main

raise SystemExit(main(sys.argv[1:]))
