"""The model as a rack of stacks: finding the block list and its boundaries (``rack``), growth in place
(``growth``), per-stack and trunk LoRA through PEFT (``adapters``) and 4-bit bases through bitsandbytes
(``quantization``).

May import: errors, deferred, schedule.
"""
