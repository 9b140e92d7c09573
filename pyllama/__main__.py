"""`python -m pyllama` runs the command line."""

import sys

from pyllama.cli import main

sys.exit(main())
