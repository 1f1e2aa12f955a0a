"""`python -m retinaperf ...` (what torchrun runs: `torchrun ... -m retinaperf run ...`)."""

from retinaperf.cli import main

raise SystemExit(main())
