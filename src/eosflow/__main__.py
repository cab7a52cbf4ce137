"""``python -m eosflow ...``: the command line of the ``eosflow`` script (for an environment whose scripts are not on
PATH, or to pick the interpreter)."""

import sys

from eosflow.cli import main

if __name__ == "__main__":  # importing every module, as test_precision does, runs nothing
    sys.exit(main())
