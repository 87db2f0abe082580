"""Model folders out of a run: the trainer's checkpoint and final saves (``saving``), ``hf-stackwise export``'s plain
HF folder with adapters merged and inactive stacks dropped (``folder``), and the Hub push (``hub``).

May import: distributed, errors, persist, rack, report, schedule.
"""
