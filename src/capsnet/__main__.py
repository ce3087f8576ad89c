"""``python -m capsnet`` (and ``torchrun -m capsnet``): the ``capsnet`` command."""

import sys

from capsnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
