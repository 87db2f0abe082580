"""Adaptive freezing in the trainer: the statistics a phase's ``autofreeze`` criterion reads, its decisions, their
record in every checkpoint and their replay on resume (the criterion itself: :mod:`hf_stackwise.schedule.autofreeze`).

1. After every optimizer step's backward (``sync_gradients``), the squared gradient norm of each stack the phase
   still trains is summed from the local gradients and all-reduced (a sum of shards under FSDP2; under DDP every
   rank holds the synchronized gradient and the maximum makes the numbers bitwise equal), so every rank feeds the
   same numbers to its :class:`~hf_stackwise.schedule.autofreeze.FreezeTracker`.
2. At a decision step (a multiple of ``every`` inside the phase) the tracker decides before the step runs; the
   trainer then applies the freeze exactly like a phase transition (``StackwiseTrainer._apply_phase``).
3. Every checkpoint's ``stackwise_state.json`` carries each autofreeze phase's tracker (decisions and the running
   statistics); a resumed run starts from it, so the rack at step k is a pure function of (recipe, k, recorded
   decisions) and the run continues bitwise equal to the uninterrupted one.
4. The activation cache treats the frozen prefix like any other: a deeper cut from the freeze on
   (:func:`hf_stackwise.cache.adaptive.deeper_cut`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from transformers.utils import logging

from .cache.adaptive import DeepeningReplay, deeper_cut
from .distributed.sharding import is_fsdp2, local
from .metrics import grad_scale
from .schedule.autofreeze import FreezeTracker
from .schedule.phases import EMBEDDINGS, stack_unit

logger = logging.get_logger(__name__)

MANIFEST_KEY = "autofreeze"  # in stackwise_state.json: one tracker per autofreeze phase that has started


def frozen_state(state, positions):
    """``state`` (a :class:`~hf_stackwise.schedule.phases.PhaseState`) with the stacks at rack ``positions`` frozen,
    and the embeddings with them (they freeze with the bottom stack)."""
    positions = set(positions)
    if not positions:
        return state
    units = {stack_unit(state.order[p]) for p in positions} | {EMBEDDINGS}
    return replace(
        state,
        trainable_stacks=tuple(p for p in state.trainable_stacks if p not in positions),
        trainable_units=state.trainable_units - units,
    )


def deepest_state(phase, state):
    """The phase's rack at its deepest allowed freeze (every stack below the lowest ``keep`` stack frozen)."""
    return frozen_state(state, phase.autofreeze.freezable(state.trainable_stacks, state.active_depth))


class AutoFreezeMixin:
    """Trainer hooks (see :class:`~hf_stackwise.trainer.StackwiseTrainer`): decisions, statistics, record, cache."""

    def _init_autofreeze(self) -> None:
        self._trackers: dict[int, FreezeTracker] = {}
        self._shallow_rows = [0]  # rows the cache served from a shallower store after a freeze (this process)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._trackers = {}
        if resume_from_checkpoint is not None:  # the decisions and statistics up to the checkpoint's step
            for raw in (self._resume_manifest or {}).get(MANIFEST_KEY, []):
                tracker = FreezeTracker.from_dict(raw)
                self._trackers[tracker.phase] = tracker
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def freeze_decisions(self) -> list[dict]:
        """Every decision so far: ``{phase, step, positions, stacks, changes, threshold}`` (stacks: physical ids)."""
        out = []
        for index in sorted(self._trackers):
            order = self.resolved.state_at(self._trackers[index].start, self._base).order
            for decision in self._trackers[index].decisions:
                stacks = [order[p] for p in decision.positions]
                out.append({"phase": index, **decision.to_dict(), "stacks": stacks})
        return out

    def _autofreeze(self, step: int, state):
        """``state`` without the units that autofreeze froze at or before ``step`` (taking the decision of a
        decision step first)."""
        settings = self.schedule.phases[state.index].autofreeze
        if settings is None:
            return state
        tracker = self._trackers.get(state.index)
        if tracker is None:
            start, end = self.resolved.bounds[state.index]
            tracker = self._trackers[state.index] = FreezeTracker(state.index, start, end)
        freezable = settings.freezable(state.trainable_stacks, state.active_depth)
        decision = tracker.step(settings, step, freezable)
        if decision is not None and self.is_world_process_zero():
            logger.info(f"[hf_stackwise] autofreeze in phase {state.name!r}: {decision.describe()}")
        return frozen_state(state, tracker.frozen_positions(step))

    def _autofreeze_observe(self) -> None:
        """Feed this step's squared gradient norm per still-training stack to the phase's tracker (all ranks)."""
        state = self._phase_state
        tracker = self._trackers.get(state.index) if state is not None else None
        if tracker is None:
            return
        positions = list(state.trainable_stacks)
        slot = {stack_unit(state.order[p]): i for i, p in enumerate(positions)}
        squares = torch.zeros(len(positions), dtype=torch.float64)
        for _, param, owners in self._params:
            if param.grad is not None and owners[0] in slot:
                squares[slot[owners[0]]] += local(param.grad).detach().double().pow(2).sum().cpu()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            squares = squares.to(self.args.device)
            dist.all_reduce(squares, op=dist.ReduceOp.SUM if is_fsdp2(self.accelerator) else dist.ReduceOp.MAX)
            squares = squares.cpu()
        scale = grad_scale(self.accelerator) ** 2
        tracker.observe({p: float(v) / scale for p, v in zip(positions, squares.tolist(), strict=True)})

    def _autofreeze_logs(self) -> dict:
        """``autofreeze/frozen_stacks``: stacks frozen by the current phase's decisions so far; a frozen unit's
        ``learning_rate/<unit>`` is 0, as for any unit its phase does not train."""
        state = self._phase_state
        tracker = self._trackers.get(state.index) if state is not None else None
        if tracker is None:
            return {}
        phase_units = self.resolved.state_at(tracker.start, self._base).trainable_units
        logs = {f"learning_rate/{unit}": 0.0 for unit in sorted(phase_units - state.trainable_units)}
        return {**logs, "autofreeze/frozen_stacks": len(tracker.frozen_positions())}

    def _manifest(self, checkpoint: bool = False) -> dict:
        manifest = super()._manifest(checkpoint)
        if self._trackers:
            manifest[MANIFEST_KEY] = [self._trackers[i].to_dict() for i in sorted(self._trackers)]
            manifest["freeze_decisions"] = self.freeze_decisions()
        return manifest

    # ---- the activation cache at a deeper cut --------------------------------------------------

    def _cache_rows_wanted(self) -> bool:
        wanted = super()._cache_rows_wanted()
        if wanted or self.cache_settings.activations is False or self.train_dataset is None:
            return wanted
        sft = self.data_plane is not None and self.data_plane.task == "sft"
        return not sft and any(p.autofreeze is not None for p in self.schedule.phases)

    def _cache_phase(self, state) -> None:
        tracker = self._trackers.get(state.index)
        if tracker is None or not tracker.frozen_positions(self.state.global_step):
            return super()._cache_phase(state)
        self._replay = None
        if self.cache_settings.activations is False:
            return
        static = self._cache_decide()[state.index]
        decision = deeper_cut(
            static,
            state,
            self.layout,
            self.cache_settings,
            self.cache_model(),
            self.cache_data(),
            (self.state.global_step, tracker.end),
            self.adapter_plan,
        )
        if not decision.on:
            if self.is_world_process_zero():
                logger.info(f"[hf_stackwise] activation cache stays off after the freeze: {decision.reason}")
            return
        stores = {decision.cut: self._store(decision.prefix, decision)}
        for prefix in decision.fills:
            stores[len(prefix)] = self._store(prefix, decision)
        self._replay = DeepeningReplay(decision, self.rack.blocks, stores, self._cache_counts, self._shallow_rows)
