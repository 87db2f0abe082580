"""What TRL's reference-model trainers (``DPOTrainer``, ``KTOTrainer``) share under a schedule: the ``reference``
field (:class:`ReferenceArguments`) and the trainer side (:class:`HeldReferenceMixin`) that builds the reference from
the model as loaded, ``copy`` / ``precompute`` / ``shared`` (see :mod:`hf_stackwise.integrations.reference`), and
captures the policy's prefix state for a ``shared`` reference around each loss computation."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

from datasets import Dataset
from transformers.utils import logging

from ..rack.quantization import disable_cpu_repack
from ..rack.rack import Rack
from ..schedule.phases import RecipeError, Schedule
from ..schedule.reference import REFERENCES, check_dpo_schedule, check_shared, reference_cuts
from .reference import SharedPrefix, frozen_copy, own_bytes
from .sft_trainer import keep_adapter_dtype

logger = logging.get_logger(__name__)


@dataclasses.dataclass
class ReferenceArguments:
    """The ``training.reference`` field (mixed into ``StackwiseDPOConfig`` / ``StackwiseKTOConfig``)."""

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

    def _refuse(self, rules) -> None:
        """One ``RecipeError`` naming every ``training.<key>`` of ``rules`` (``(key, bad, rule)``) that is bad."""
        problems = [f"training.{key}: {getattr(self, key)!r} {rule}" for key, bad, rule in rules if bad]
        if problems:
            raise RecipeError(problems)

    def _check_reference(self) -> None:
        if self.reference not in REFERENCES:
            raise RecipeError(f"training.reference: {self.reference!r} is not one of {REFERENCES}")
        if self.precompute_ref_log_probs and self.reference not in ("auto", "precompute"):
            raise RecipeError(
                f"training.precompute_ref_log_probs: true contradicts `reference: {self.reference}`; use "
                "`reference: precompute` alone"
            )
        if self.sync_ref_model:
            raise RecipeError(
                "training.sync_ref_model: TR-DPO moves the reference during training, so neither `shared` (initial "
                "copies) nor `precompute` holds; not supported with a schedule"
            )


class HeldReferenceMixin:
    """Builds ``ref_model`` before TRL's ``__init__`` (:meth:`_hold_reference`), finishes it after
    (:meth:`_reference_ready`), and runs each loss computation with the ``shared`` capture. The captured states queue:
    a trainer that runs the policy on several batches (KTO: the KL batch, then the completions) and then the
    reference on the same batches in the same order gets each one back."""

    def _hold_reference(self, model, args, train_dataset):
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
        return ref_model

    def _reference_ready(self, task: str) -> None:
        keep_adapter_dtype(self._base_model(), self.model)  # as for sft: the recipe's compute dtype, not bf16
        if self.reference_way == "precompute":
            self.ref_model = None  # the log-probs are in the datasets now
        if self._prefix is not None:
            self._prefix.install(self.accelerator.unwrap_model(self.ref_model))
        if self.is_world_process_zero():
            way, mib = self.reference_way, self.reference_bytes / 2**20
            logger.info(
                f"[hf_stackwise] {task} reference: {way}, {mib:.1f} MiB of its own"
                + (f", forward from stacks {self.reference_cuts} per phase" if way == "shared" else "")
            )

    def _reference_cut(self) -> int:
        """Blocks below the cut of the phase applied now (phase 0 before training): a later phase's cut is lower or
        equal, and valid for every earlier weight state."""
        index = self._phase_state.index if self._phase_state is not None else 0
        return self.rack.boundaries[self.reference_cuts[index]]

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
