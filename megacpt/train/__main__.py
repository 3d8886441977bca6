"""`python -m megacpt.train CONFIG.yaml [--set ...]`: one rank of a run (part of the CLI layer)."""

import sys

from megacpt.cli.train import main

sys.exit(main())
