"""The schedule inside other libraries' trainers: TRL's ``SFTTrainer`` (``sft_trainer``), ``DPOTrainer``
(``dpo_trainer``) and ``KTOTrainer`` (``kto_trainer``), the last two with the reference model held three ways
(``held_reference``: the shared field and trainer side; ``reference``: the copies and the shared prefix).

May import: cache, data, errors, rack, schedule, trainer.
"""
