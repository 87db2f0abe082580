"""The data: loading and chunking text (``loading``), the data plane over time (``plane``: task, row length, mask
rate, mixture weights at step k) and its batch transforms in the training step (``trainer_mixin``, ``masking``),
mixtures (``mixture``), and the tasks' own data: SFT (``sft``, ``sft_recipe``), preference pairs (``preference``,
``preference_recipe``) and classification (``classification``, ``labels``).

May import: errors, metrics, schedule.
"""
