"""Faults a long run meets: preemption (SIGTERM), a process killed mid-checkpoint, and divergence.

- **SIGTERM** (what Slurm, Kubernetes and spot instances send before they kill a job): the run finishes the
  optimizer step it is in, saves a normal checkpoint of that step and stops; the CLI exits with
  :data:`PREEMPTED_EXIT_CODE`. Under DDP every rank agrees on the step (a MAX all-reduce of the flag at each
  step end), whichever rank got the signal.
- **kill -9**: every checkpoint gets ``stackwise_complete.json`` last, only once all ranks wrote their files,
  and older checkpoints are rotated away only after that; ``resume_from_checkpoint: true`` takes the last
  checkpoint whose marker matches its files (:func:`hf_stackwise.persist.checkpoint.incomplete_reason`).
- **Divergence**: before the optimizer applies a step, its loss and gradient norm must be finite. By default a
  non-finite one stops the run with :class:`NonFiniteError`; ``nonfinite: skip`` drops that step's gradients
  instead (the optimizer does not move, the step counter and the schedule do), up to ``max_skipped_steps``.
  The norm checked is the one the Trainer computes anyway (for clipping, or for its ``grad_norm`` log), taken
  from ``Trainer._get_grad_norm`` between clipping and ``optimizer.step()``: no extra pass over the gradients.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .errors import StackwiseError
from .persist.checkpoint import last_complete_checkpoint, mark_complete, unmark_complete

logger = logging.get_logger(__name__)
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: "ended by SIGTERM", so a scheduler requeues rather than finishes
NONFINITE_POLICIES = ("stop", "skip")
# transformers >= 5 computes the step's gradient norm in `_get_grad_norm` (clipping or not): the guard reuses it
_REUSES_NORM = hasattr(Trainer, "_get_grad_norm")


class NonFiniteError(StackwiseError):
    """A step's loss or gradient norm (or the weights) became non-finite; the message names the step and phase."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of ``flags`` over the ranks (a no-op in one process)."""
    if _distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class Preemption(TrainerCallback):
    """On SIGTERM, finish the current optimizer step, save a checkpoint of it and stop training.

    The handler only sets a flag; ``on_step_end`` (after the optimizer step, before the Trainer's save) turns it
    into ``should_save`` + ``should_training_stop``. ``stopped_at`` is the step saved, or None."""

    def __init__(self):
        self.signalled = False
        self.stopped_at: int | None = None
        self._installed = False
        self._previous = None

    def install(self) -> None:
        """Catch SIGTERM until :meth:`restore` (only the main thread may install signal handlers)."""
        self.signalled, self.stopped_at = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True

    def restore(self) -> None:
        """Put back the handler that was there before (the default one if it was not set from Python)."""
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def on_step_end(self, args, state, control, **kwargs):
        stop = bool(_any_rank(torch.tensor([float(self.signalled)], device=args.device)).item())
        if stop and not control.should_training_stop:  # on the last step the run simply ends
            control.should_save = True
            control.should_evaluate = False  # the grace period is for the checkpoint
            control.should_training_stop = True
            self.stopped_at = state.global_step
            if state.is_world_process_zero:
                logger.warning(f"[hf_stackwise] SIGTERM: stopping after step {state.global_step}, saving it")
        return control


class FaultTolerance:
    """``StackwiseTrainer`` hooks: the SIGTERM handler around ``train``, the non-finite guard after each step's
    last backward, and checkpoints marked complete after every file (of every rank) is written."""

    def _init_faults(self) -> None:
        self.preemption = Preemption()
        self.add_callback(self.preemption)
        self._step_losses: list[torch.Tensor] = []

    def train(self, *args, **kwargs):
        self.preemption.install()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.preemption.restore()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.args.nonfinite == "skip" and "loss" in logs:
            logs["skipped_steps"] = len(self.skipped_steps())
        super().log(logs, start_time)

    # ---- divergence ----------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(loss.detach())
        if self.accelerator.sync_gradients and not _REUSES_NORM:  # older Trainer: check with a norm of our own
            self._guard_nonfinite(self._take_step_losses())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's norm of the step's gradients (the pre-clip norm when it clips), checked before
        ``optimizer.step()``: it runs once per optimizer step, after the step's last backward."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_nonfinite(self._take_step_losses(), norm)
        return norm

    def _take_step_losses(self) -> torch.Tensor:
        losses, self._step_losses = torch.stack(self._step_losses), []
        return losses

    def _guard_nonfinite(self, losses: torch.Tensor, norm=None) -> None:
        if norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=losses.device)
        if hasattr(norm, "full_tensor"):  # FSDP2: sharded gradients give a partial norm (one all-reduce)
            norm = norm.full_tensor()
        norm = torch.as_tensor(norm, dtype=torch.float32)
        flags = torch.stack([(~torch.isfinite(losses)).any(), ~torch.isfinite(norm.to(losses.device))]).float()
        bad_loss, bad_grad = (bool(f) for f in _any_rank(flags).tolist())
        if not (bad_loss or bad_grad):
            return
        what = []
        if bad_loss:
            values = sorted({str(v) for v in losses.tolist() if not torch.isfinite(torch.tensor(v))})
            what.append(f"the loss is {' / '.join(values)}" if values else "the loss is non-finite on another rank")
        if bad_grad:
            units = self._nonfinite_units()
            where = f" (non-finite gradients in {', '.join(units)})" if units else ""
            what.append(f"the gradient norm is {float(norm)}{where}")
        self._on_nonfinite(" and ".join(what))

    def _nonfinite_units(self) -> list[str]:
        units: list[str] = []
        for _, param, owners in self._params:
            if param.grad is not None and not torch.isfinite(param.grad).all() and owners[0] not in units:
                units.append(owners[0])
        return units

    def skipped_steps(self) -> list[int]:
        """Steps skipped for a non-finite loss or gradient, this run (resumes included, from the log history)."""
        return [h["skipped_step"] for h in self.state.log_history if "skipped_step" in h]

    def _on_nonfinite(self, what: str) -> None:
        step = self.state.global_step + 1  # the step being taken, numbered as the logs number it
        phase = self._phase_state.name if self._phase_state is not None else "?"
        where = f"step {step} of {self.state.max_steps} (phase {phase!r}, t={self.resolved.t(step - 1):.3f})"
        skipped = self.skipped_steps()
        limit = self.args.max_skipped_steps
        if self.args.nonfinite == "skip" and len(skipped) < limit:
            for param in self.model.parameters():
                param.grad = None  # the optimizer skips parameters without gradient: the weights do not move
            self.state.log_history.append(
                {
                    "step": step,
                    "skipped_step": step,
                    "skipped_steps": len(skipped) + 1,
                    "phase": phase,
                    "nonfinite": what,
                }
            )
            logger.warning(f"[hf_stackwise] {where}: {what}; step skipped ({len(skipped) + 1} of at most {limit})")
            return
        if self.args.nonfinite == "skip":
            what += f", and {limit} steps were skipped already ({skipped}; `training.max_skipped_steps: {limit}`)"
        raise NonFiniteError(
            f"training.nonfinite: {where}: {what}. The step was not applied: the weights in memory and in every "
            f"checkpoint are finite ({self._last_checkpoint_note()}). Lower the learning rate, clip gradients "
            "(`training.max_grad_norm`), or set `training.nonfinite: skip` to skip up to "
            "`training.max_skipped_steps` such steps; then resume with `training.resume_from_checkpoint: true`"
        )

    def _last_checkpoint_note(self) -> str:
        last = last_complete_checkpoint(self.args.output_dir)
        return f"the last is {os.path.basename(last)}" if last else "no checkpoint was written yet"

    # ---- complete checkpoints ----------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then the completion marker (after every rank's files), then rotation."""
        # only what the optimizer updates: frozen tensors are checksummed, and packed 4-bit weights stored as floats
        # (FSDP2's `quant_storage`) hold bit patterns that read as NaN
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        nonfinite = [
            n for n, p in self.model.named_parameters() if id(p) in optimized and not torch.isfinite(p.detach()).all()
        ]
        step = self.state.global_step
        if nonfinite:  # an optimizer update overflowed although its gradient was finite: never save that
            raise NonFiniteError(
                f"training.nonfinite: after step {step} the weights are non-finite ({len(nonfinite)} tensors, first "
                f"{nonfinite[0]}), so checkpoint-{step} was not written. Lower the learning rate and resume with "
                "`training.resume_from_checkpoint: true`"
            )
        run_dir = self._get_output_dir(trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if self.args.should_save:
            unmark_complete(folder)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once this checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (its RNG state) are on disk
        if self.args.should_save:
            mark_complete(folder, step)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)
