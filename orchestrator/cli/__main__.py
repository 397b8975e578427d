"""`python -m orchestrator.cli ARGS`: what a submitted Ray job runs (orchestrator/cluster/jobs.py)."""

import sys

from orchestrator.cli import main

sys.exit(main())
