import sys

from megacpt.train.cli import main

sys.exit(main())
