"""``python -m hf_stackwise`` is ``hf-stackwise``, so ``accelerate launch -m`` and ``torchrun -m`` work."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
