"""The stackwise trainer and arguments combined with TRL's ``DPOTrainer`` / ``DPOConfig`` (``data.task: dpo``; see
:mod:`hf_stackwise.data.preference` for the data). Every DPO setting TRL has (``beta``, ``loss_type``,
``loss_weights``, ``label_smoothing``, ``ld_alpha``, ...) is a field here, so a recipe sets it under ``training:``.
Importing this module imports trl."""

from __future__ import annotations

import dataclasses

import trl
from transformers.utils import logging

from ..cache.activations import PairRows
from ..data.plane import DataPlane
from ..trainer import StackwiseArguments, StackwiseTrainer
from .held_reference import HeldReferenceMixin, ReferenceArguments, resolve_reference

logger = logging.get_logger(__name__)

__all__ = ["StackwiseDPOConfig", "StackwiseDPOTrainer", "resolve_reference"]


@dataclasses.dataclass
class StackwiseDPOConfig(StackwiseArguments, ReferenceArguments, trl.DPOConfig):
    """``trl.DPOConfig`` + the schedule + how the reference model is held. TrainingArguments' defaults are kept where
    TRL changes them (gradient checkpointing off, no bf16, logging every 500 steps, lr 5e-5), as for ``sft``."""

    learning_rate: float = 5e-5
    logging_steps: float = 500
    gradient_checkpointing: bool | None = None  # TrainingArguments: None, i.e. off (TRL: True)
    bf16: bool | None = False

    def __post_init__(self):
        self._check_reference()
        self._refuse(
            (
                ("beta", not self.beta > 0, "is not a positive number (the KL weight)"),
                ("label_smoothing", not 0 <= self.label_smoothing <= 0.5, "is not in [0, 0.5]"),
                (
                    "ld_alpha",
                    self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1,
                    "is not in [0, 1]",
                ),
                ("discopop_tau", not self.discopop_tau > 0, "is not a positive number"),
                (
                    "loss_weights",
                    self.loss_weights is not None and any(not w >= 0 for w in self.loss_weights),
                    "has a negative weight",
                ),
                (
                    "precompute_ref_batch_size",
                    self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1,
                    "is not a positive batch size",
                ),
            )
        )
        super().__post_init__()


class StackwiseDPOTrainer(HeldReferenceMixin, StackwiseTrainer, trl.DPOTrainer):
    """``StackwiseTrainer`` over TRL's ``DPOTrainer``: the schedule trains the policy, the reference is held as
    ``args.reference`` says (see :mod:`hf_stackwise.integrations.reference`). Pass the base model (not a PEFT model)
    and no ``ref_model``: the reference is built from the model as loaded."""

    def __init__(self, model=None, args: StackwiseDPOConfig | None = None, train_dataset=None, **kwargs):
        if not isinstance(args, StackwiseDPOConfig):
            raise TypeError("StackwiseDPOTrainer needs `args` to be a StackwiseDPOConfig")
        if kwargs.get("ref_model") is not None:
            raise ValueError("StackwiseDPOTrainer builds the reference itself (`args.reference`); pass no ref_model")
        if args.data_plane is None:  # from Python: the rows are pairs (the cache and the data plane need the task)
            args.data_plane = DataPlane(task="dpo", max_seq_length=args.max_length or 1024).to_dict()
        ref_model = self._hold_reference(model, args, train_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset, ref_model=ref_model, **kwargs)
        self._reference_ready("DPO")

    # ---- the activation cache: a pair is two stored rows (chosen 2i, rejected 2i + 1; see PairRows) ----------

    def get_train_dataloader(self):
        collator = self.data_collator
        self.data_collator = PairRows(collator)  # carries the row ids through TRL's collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def cache_data(self):
        data = super().cache_data()
        rows = data.rows * 2 if data.rows is not None else None
        return dataclasses.replace(data, rows=rows, global_batch=data.global_batch * 2)

    def _cache_exposed_cuts(self, state) -> tuple[int, ...]:
        """The ``shared`` reference reads the policy's hidden state at its cut, which may lie below the cache's."""
        if self._prefix is None:
            return ()
        return (self.rack.boundaries[self.reference_cuts[state.index]],)
