"""`python -m megacpt.preflight` = `megacpt preflight`, for launchers that start a module on every
rank (srun python -m, deepspeed --module, torchrun -m, mpirun python -m)."""

import sys

from megacpt.cli.preflight import main

sys.exit(main())
