"""`torchrun --nproc-per-node N -m orchestrator.torchrun [overrides]`: the documented command; the launcher
itself is orchestrator/launch/torchrun.py."""

import sys

from orchestrator.launch.torchrun import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
