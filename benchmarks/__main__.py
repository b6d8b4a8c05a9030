"""`python -m benchmarks ...` from the repository root: a run, or (`--client CONFIG`) one of
the client processes a run starts."""

import sys

from benchmarks.cli import main

raise SystemExit(main(sys.argv[1:]))
