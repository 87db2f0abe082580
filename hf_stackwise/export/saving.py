"""How a ``StackwiseTrainer`` saves and loads: checkpoints that resume exactly, a final folder that is the trained
model, and the Hub push of its export (:mod:`hf_stackwise.persist.weights` says what each folder holds).

A mixin of the trainer (it reads the trainer's rack, layout, schedule and adapter plan), kept apart so the trainer
holds the phase logic and this module the files.
"""

from __future__ import annotations

import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed.sharding import arranged_state_dict, only_saved_state_trainable
from ..persist.checkpoint import FORMAT_VERSION, MANIFEST_NAME, write_json
from ..persist.weights import (
    TRAINABLE_WEIGHTS_NAME,
    hide_weights,
    is_unarranged,
    load_trainable,
    load_unarranged,
    remove_model_files,
    save_trainable,
)
from ..rack.rack import stored_as
from .hub import push_export


class SavingMixin:
    """``_save`` / ``_save_checkpoint`` / ``_load_from_checkpoint`` / ``save_model`` / ``push_to_hub`` of
    ``StackwiseTrainer``."""

    _saving_checkpoint = False

    def _manifest(self, checkpoint: bool = False) -> dict:
        step = self.weights_step()  # the best checkpoint's step once early stopping has loaded it
        state = self.resolved.state_at(max(step - 1, 0), self._base)
        stopped = {} if step == self.state.global_step else {"stopped_at_step": self.state.global_step}
        return {
            **stopped,
            "format_version": FORMAT_VERSION,
            "schedule_hash": self.schedule.fingerprint(),
            "run": self.run_identity(),
            "rack": self.base_topology(),
            "base_model": getattr(self._base_model(), "name_or_path", None),
            "quantization": self._quantization(),
            "global_step": step,
            "t": self.resolved.t(step),
            "phase": {
                "index": state.index,
                "name": state.name,
                "trainable_stacks": list(state.trainable_stacks),
                "blocks": self.producing_blocks(),  # physical blocks, bottom → top, that export keeps
            },
            "next_phase": self.resolved.state_at(step, self._base).name,
            # "arranged": the folder's model holds exactly phase.blocks, in that order; "physical": every block
            # in storage order (or, in adapter runs, the trained tensors of stackwise_trainable.safetensors)
            "weights": "physical" if checkpoint or self.adapter_plan else "arranged",
            **self._classifier_manifest(),
        }

    def _classifier_manifest(self) -> dict:
        """A classifier's label set and pad id: what an adapter run's export needs to rebuild its head."""
        model = self._base_model()
        if not type(model).__name__.endswith("ForSequenceClassification"):
            return {}
        config = model.config
        labels = {str(i): name for i, name in config.id2label.items()}
        return {"classifier": {"id2label": labels, "pad_token_id": config.pad_token_id}}

    def _stores_function(self) -> bool:
        """Whether the blocks in storage order are the function the producing phase runs (no growth, full depth)."""
        return not self.layout.grows and self.producing_blocks() == list(range(self.layout.num_base_blocks))

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``stackwise_state.json`` first, so Hub pushes of the checkpoint carry it; the weights are stored
        for resume (see :mod:`hf_stackwise.persist.weights`)."""
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            write_json(os.path.join(folder, MANIFEST_NAME), self._manifest(checkpoint=True))
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A final save of a full-weight run is the plain model of the producing phase (its blocks in its order,
        inactive and not-yet-grown ones dropped); a checkpoint keeps every block, under the ``unarranged`` variant
        when storage order is not the function. Adapter runs save ``stackwise_trainable.safetensors`` only."""
        output_dir = output_dir or self.args.output_dir
        checkpoint = self._saving_checkpoint
        if self.adapter_plan:
            tensors = self._trainable_tensors()
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                if not checkpoint:  # a run folder must not keep a model of an earlier save
                    remove_model_files(output_dir, self.adapter_plan)
                save_trainable(tensors, output_dir)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
            return
        if checkpoint or self._stores_function():
            super()._save(output_dir, state_dict)
            if checkpoint and self.args.should_save and not self._stores_function():
                hide_weights(output_dir)
            return
        blocks = self.producing_blocks()
        if state_dict is not None:  # FSDP2: the Trainer gathered the full state dict (physical blocks) on rank 0
            state_dict = arranged_state_dict(state_dict, self.rack.layers_path, blocks)
        with stored_as(self._base_model(), self.rack.layers_path, blocks):
            super()._save(output_dir, state_dict)

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Every ever-trainable tensor of an adapter run: fully trained stacks are not part of PEFT's adapters, and
        resume needs them exactly."""
        return {  # FSDP2: each sharded tensor gathered in full (every rank calls `_save` then)
            name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu().contiguous()
            for name, param, owners in self._params
            if any(u in self._saved_units for u in owners)
        }

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Adapter runs resume from ``stackwise_trainable.safetensors`` (every adapter, every trained stack); full runs
        from the ``unarranged`` variant when the checkpoint has one."""
        model = self.model if model is None else model
        if self.adapter_plan:
            load_trainable(model, os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS_NAME))
        elif is_unarranged(resume_from_checkpoint) and not self.is_fsdp_enabled:  # FSDP: its full state dict file
            load_unarranged(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with only_saved_state_trainable(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: read the best checkpoint the way resume does; from then on the model runs,
        saves and exports as the phase of the best checkpoint."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)
        self._weights_step = self.state.best_global_step

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does (see :meth:`_save`); a final save also gets ``stackwise_state.json`` so it can be
        exported, before ``push_to_hub`` (like the Trainer, a final save pushes when ``args.push_to_hub``)."""
        super().save_model(output_dir, _internal_call=True)
        if not _internal_call:
            self.save_manifest(output_dir)
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_manifest(self, output_dir: str | None = None) -> None:
        """Write ``stackwise_state.json`` beside a final save (what ``hf-stackwise export`` reads)."""
        if self.args.should_save and self.resolved is not None:
            write_json(os.path.join(output_dir or self.args.output_dir, MANIFEST_NAME), self._manifest())

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """Upload the run's export (a plain model folder with its model card) instead of the training folder, with
        the Trainer's repository, token and revision; see :mod:`hf_stackwise.export.hub`."""
        return push_export(
            self, commit_message, blocking, kwargs.get("token"), kwargs.get("revision"), kwargs.get("private")
        )
