"""`python -m retinaperf ...` (what torchrun runs: `torchrun ... -m retinaperf run ...`)."""

from .cli import main

raise SystemExit(main())
