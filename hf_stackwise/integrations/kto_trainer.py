"""The stackwise trainer and arguments combined with TRL's ``KTOTrainer`` / ``KTOConfig`` (``data.task: kto``):
unpaired preference data (``prompt``, ``completion``, ``label``; paired ``prompt``/``chosen``/``rejected`` rows are
unpaired by TRL), the reference held as for DPO (``training.reference``; see
:mod:`hf_stackwise.integrations.held_reference`). A KTO step runs the policy on the mismatched KL batch and on the
completions, then the reference on both in the same order: a ``shared`` reference takes the two captured prefix
states in turn. Importing this module imports trl."""

from __future__ import annotations

import dataclasses

import trl

from ..data.plane import DataPlane
from ..trainer import StackwiseArguments, StackwiseTrainer
from .held_reference import HeldReferenceMixin, ReferenceArguments

__all__ = ["StackwiseKTOConfig", "StackwiseKTOTrainer"]


@dataclasses.dataclass
class StackwiseKTOConfig(StackwiseArguments, ReferenceArguments, trl.KTOConfig):
    """``trl.KTOConfig`` + the schedule + how the reference model is held (TrainingArguments' defaults kept where TRL
    changes them, as for ``dpo``). TRL's ``train_sampling_strategy: sequential`` stays: the KL completions are fixed
    against each row's batch neighbours when TRL tokenizes the data."""

    learning_rate: float = 5e-5
    logging_steps: float = 500
    gradient_checkpointing: bool | None = None  # TrainingArguments: None, i.e. off (TRL: True)
    bf16: bool | None = False
    train_sampling_strategy: str = "sequential"  # TRL's KTO default (TrainingArguments: random)

    def __post_init__(self):
        self._check_reference()
        self._refuse(
            (
                ("beta", not self.beta > 0, "is not a positive number (the KL weight)"),
                ("desirable_weight", not self.desirable_weight > 0, "is not positive"),
                ("undesirable_weight", not self.undesirable_weight > 0, "is not positive"),
                (
                    "loss_type",
                    self.loss_type not in ("kto", "apo_zero_unpaired"),
                    "is not one of kto, apo_zero_unpaired",
                ),
                (
                    "train_sampling_strategy",
                    self.loss_type == "kto" and self.train_sampling_strategy != "sequential",
                    "breaks the KL estimate: TRL fixes each row's mismatched KL completion against its batch "
                    "neighbours; keep `sequential`",
                ),
            )
        )
        super().__post_init__()


class StackwiseKTOTrainer(HeldReferenceMixin, StackwiseTrainer, trl.KTOTrainer):
    """``StackwiseTrainer`` over TRL's ``KTOTrainer``; the reference as ``args.reference`` says. Pass the base model
    (not a PEFT model) and no ``ref_model``."""

    def __init__(self, model=None, args: StackwiseKTOConfig | None = None, train_dataset=None, **kwargs):
        if not isinstance(args, StackwiseKTOConfig):
            raise TypeError("StackwiseKTOTrainer needs `args` to be a StackwiseKTOConfig")
        if kwargs.get("ref_model") is not None:
            raise ValueError("StackwiseKTOTrainer builds the reference itself (`args.reference`); pass no ref_model")
        if args.data_plane is None:  # from Python: the rows are labelled completions (the cache needs the task)
            args.data_plane = DataPlane(task="kto", max_seq_length=args.max_length or 1024).to_dict()
        ref_model = self._hold_reference(model, args, train_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset, ref_model=ref_model, **kwargs)
        self._reference_ready("KTO")
