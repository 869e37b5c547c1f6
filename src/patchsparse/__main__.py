"""`python -m patchsparse ...` is the `patchsparse` command; so is `torchrun ... -m patchsparse ...`."""

import sys

from patchsparse.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
