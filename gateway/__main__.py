"""``python -m gateway``: the command line (``gateway.cli``)."""

import sys

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
