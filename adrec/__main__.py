"""`python -m adrec` is the `adrec` command."""

import sys

from adrec.cli import main

sys.exit(main())
