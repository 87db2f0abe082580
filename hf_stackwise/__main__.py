"""``python -m hf_stackwise`` = ``hf-stackwise`` (so ``accelerate launch -m hf_stackwise`` and ``torchrun -m`` work)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
