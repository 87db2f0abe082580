"""The schedule inside other libraries' trainers: TRL's ``SFTTrainer`` (``sft_trainer``) and ``DPOTrainer``
(``dpo_trainer``, with the reference model held three ways in ``reference``).

May import: cache, data, errors, rack, schedule, trainer.
"""
