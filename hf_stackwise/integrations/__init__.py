"""The schedule inside other libraries' trainers: TRL's ``SFTTrainer`` (``sft_trainer``).

May import: data, errors, schedule, trainer.
"""
