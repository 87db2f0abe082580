"""The stackwise trainer and arguments combined with TRL's ``DPOTrainer`` / ``DPOConfig`` (``data.task: dpo``; see
:mod:`hf_stackwise.data.preference` for the data). Every DPO setting TRL has (``beta``, ``loss_type``,
``loss_weights``, ``label_smoothing``, ``ld_alpha``, ...) is a field here, so a recipe sets it under ``training:``.
Importing this module imports trl."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import trl
from datasets import Dataset
from transformers.utils import logging

from ..cache.activations import PairRows
from ..data.plane import DataPlane
from ..rack.quantization import disable_cpu_repack
from ..rack.rack import Rack
from ..schedule.phases import RecipeError, Schedule
from ..schedule.reference import REFERENCES, check_dpo_schedule, check_shared, reference_cuts
from ..trainer import StackwiseArguments, StackwiseTrainer
from .reference import SharedPrefix, frozen_copy, own_bytes
from .sft_trainer import keep_adapter_dtype

logger = logging.get_logger(__name__)

__all__ = ["StackwiseDPOConfig", "StackwiseDPOTrainer"]


@dataclasses.dataclass
class StackwiseDPOConfig(StackwiseArguments, trl.DPOConfig):
    """``trl.DPOConfig`` + the schedule + how the reference model is held. TrainingArguments' defaults are kept where
    TRL changes them (gradient checkpointing off, no bf16, logging every 500 steps, lr 5e-5), as for ``sft``."""

    learning_rate: float = 5e-5
    logging_steps: float = 500
    gradient_checkpointing: bool | None = None  # TrainingArguments: None, i.e. off (TRL: True)
    bf16: bool | None = False

    # Parameters that control the reference model
    reference: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "How the reference model is held: `copy` (TRL's frozen full copy), `precompute` (TRL's "
            "`precompute_ref_log_probs`: one pass before training, no reference in memory), `shared` (the policy's "
            "hidden state below the lowest stack that ever trains is reused; only what trains is copied), or `auto` "
            "(the cheapest exact one: `precompute` for a map-style dataset, else `shared` if some prefix never "
            "trains, else `copy`).",
            "choices": list(REFERENCES),
        },
    )

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise RecipeError(f"training.reference: {self.reference!r} is not one of {REFERENCES}")
        if self.precompute_ref_log_probs and self.reference not in ("auto", "precompute"):
            raise RecipeError(
                f"training.precompute_ref_log_probs: true contradicts `reference: {self.reference}`; use "
                "`reference: precompute` alone"
            )
        problems = [
            f"training.{key}: {value!r} {rule}"
            for key, value, bad, rule in (
                ("beta", self.beta, not self.beta > 0, "is not a positive number (the KL weight)"),
                ("label_smoothing", self.label_smoothing, not 0 <= self.label_smoothing <= 0.5, "is not in [0, 0.5]"),
                (
                    "ld_alpha",
                    self.ld_alpha,
                    self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1,
                    "is not in [0, 1]",
                ),
                ("discopop_tau", self.discopop_tau, not self.discopop_tau > 0, "is not a positive number"),
                (
                    "loss_weights",
                    self.loss_weights,
                    self.loss_weights is not None and any(not w >= 0 for w in self.loss_weights),
                    "has a negative weight",
                ),
                (
                    "precompute_ref_batch_size",
                    self.precompute_ref_batch_size,
                    self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1,
                    "is not a positive batch size",
                ),
            )
            if bad
        ]
        if problems:
            raise RecipeError(problems)
        if self.sync_ref_model:
            raise RecipeError(
                "training.sync_ref_model: TR-DPO moves the reference during training, so neither `shared` (initial "
                "copies) nor `precompute` holds; not supported with a schedule"
            )
        super().__post_init__()


class StackwiseDPOTrainer(StackwiseTrainer, trl.DPOTrainer):
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
        rack = Rack.from_model(model, args.rack_layers, args.blocks_per_stack, args.stack_boundaries)
        schedule = Schedule.from_list(args.schedule).for_rack(rack.sizes)
        check_dpo_schedule(schedule, rack.sizes)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        way = resolve_reference(args.reference, train_dataset, schedule, rack.sizes, tied)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if quantized and way == "copy":
            raise RecipeError(
                "training.reference: `copy` of a 4-bit base would hold a second quantized model and dequantize it "
                "on every reference forward; use `shared` (the base's tensors are shared) or `precompute`"
            )
        disable_cpu_repack(model)  # before the reference copies its Linear4bit modules (see rack.quantization)
        self.reference_way = way
        self.reference_cuts = reference_cuts(schedule, rack.sizes, tied)
        self._prefix: SharedPrefix | None = None
        ever = schedule.ever_trainable_units(rack.sizes)
        trained = {id(p) for unit, params in rack.parameter_units().items() if unit in ever for _, p in params}
        never_trained = [p for p in model.parameters() if id(p) not in trained]
        ref_model = None
        if way == "copy":
            ref_model = frozen_copy(model)
        elif way == "shared":
            ref_model = frozen_copy(model, never_trained)
            self._prefix = SharedPrefix(rack.layers_path, rack.num_blocks)
        elif way == "precompute" and schedule.uses_lora():
            # TRL's reference for a PEFT model without `ref_model` expects one adapter named "default"; the
            # schedule's adapters are named per stack. The precompute pass runs on a shared copy, dropped after it.
            ref_model = frozen_copy(model, never_trained)
        args.precompute_ref_log_probs = way == "precompute"
        self.reference_bytes = own_bytes(ref_model, model) if way in ("copy", "shared") else 0
        super().__init__(model=model, args=args, train_dataset=train_dataset, ref_model=ref_model, **kwargs)
        keep_adapter_dtype(self._base_model(), self.model)  # as for sft: the recipe's compute dtype, not bf16
        if way == "precompute":
            self.ref_model = None  # the log-probs are in the datasets now
        if self._prefix is not None:
            self._prefix.install(self.accelerator.unwrap_model(self.ref_model))
        if self.is_world_process_zero():
            logger.info(
                f"[hf_stackwise] DPO reference: {way}, {self.reference_bytes / 2**20:.1f} MiB of its own"
                + (f", forward from stacks {self.reference_cuts} per phase" if way == "shared" else "")
            )

    def _reference_cut(self) -> int:
        """Blocks below the cut of the phase applied now (phase 0 before training): a later phase's cut is lower or
        equal, and valid for every earlier weight state."""
        index = self._phase_state.index if self._phase_state is not None else 0
        return self.rack.boundaries[self.reference_cuts[index]]

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

    def _compute_loss(self, model, inputs, return_outputs):
        with trl_reads_deprecated_checkpointing():
            if self._prefix is None:
                return super()._compute_loss(model, inputs, return_outputs)
            # inside the step's arrangement, `rack.blocks` is the arranged list: with the cache on, the replay module
            # at the cut's position, which returns the stored state on a hit (the real block does not run then)
            with self._prefix.capture(self.rack.blocks, self._reference_cut()):
                return super()._compute_loss(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        with trl_reads_deprecated_checkpointing():
            return super().compute_ref_log_probs(model, inputs)


@contextlib.contextmanager
def trl_reads_deprecated_checkpointing():
    """TRL 1.16's reference forward reads transformers 5's deprecated ``is_gradient_checkpointing``: not the user's
    doing, so not their warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def resolve_reference(way: str, train_dataset, schedule, sizes: tuple[int, ...], tied: bool) -> str:
    """``auto`` → the cheapest exact way; ``shared`` is checked against the schedule (see ``check_shared``)."""
    if way == "auto":
        if isinstance(train_dataset, Dataset):
            return "precompute"
        way = "shared" if reference_cuts(schedule, sizes, tied)[-1] > 0 else "copy"
    if way == "shared":
        check_shared(schedule, sizes, tied)
    if way == "precompute" and not isinstance(train_dataset, Dataset):
        raise RecipeError(
            "training.reference: `precompute` stores a log-prob per training row, and the data is streamed (or a "
            "mixture); use `shared` or `copy`"
        )
    return way
