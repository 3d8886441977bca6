"""`python -m megacpt.cli ...` = the `megacpt` command."""

import sys

from megacpt.cli import main

sys.exit(main())
