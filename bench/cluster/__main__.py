"""``python -m bench.cluster``: see bench.cluster.run."""

import sys

from bench.cluster.run import main

if __name__ == "__main__":
    sys.exit(main())
