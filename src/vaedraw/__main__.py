"""`python -m vaedraw` (also what torchrun launches): the command line."""

import sys

from .cli import main

sys.exit(main())
