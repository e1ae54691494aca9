"""`python -m tightfit.cli ...`: the same as the `tightfit` command."""

import sys

from tightfit.cli import main

if __name__ == "__main__":
    sys.exit(main())
