"""`python -m megacpt ...` = the `megacpt` command."""

import sys

from megacpt.cli import main

sys.exit(main())
