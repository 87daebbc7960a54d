"""``python -m dropmuon.compare``: the ``dropmuon-compare`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
