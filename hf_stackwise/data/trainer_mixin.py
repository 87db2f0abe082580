"""The trainer's data plane: time-dependent batch transforms, masked-task loss and eval metrics.

``DataPlaneMixin`` is mixed into :class:`~hf_stackwise.trainer.StackwiseTrainer`. It applies the pure
functions of :mod:`hf_stackwise.data.masking` to the micro-batches of step k once they are fetched in the main
process, so DataLoader workers and accelerate's prefetching never need to know the phase
(a collator would see the wrong phase), and it reads a :class:`~hf_stackwise.data.mixture.MixtureDataset` in order.
"""

from __future__ import annotations

import math

import torch

from ..metrics import is_causal_lm
from ..schedule.phases import RecipeError
from .masking import IGNORE_INDEX, Vocabulary, mask_for_diffusion, mask_for_mlm, split_rows
from .mixture import MixtureDataset
from .plane import DataPlane, DataState
from .sft import truncate_for_phase


class DataPlaneMixin:
    """Trainer hooks driven by ``args.data_plane``; without it every hook is the Trainer's own."""

    def _init_data_plane(self) -> None:
        """Read ``args.data_plane``; masked tasks need the tokenizer's mask token and special tokens."""
        self.data_plane = DataPlane.from_dict(self.args.data_plane) if self.args.data_plane else None
        self._vocab: Vocabulary | None = None
        self._masked_counts = torch.zeros(2, dtype=torch.long)  # eval: correct, masked tokens
        if self.data_plane is not None and self.data_plane.masked(self.schedule):
            if getattr(self.processing_class, "mask_token_id", None) is None:
                raise RecipeError(
                    "data.task: mlm / diffusion need a tokenizer with a mask token; pass it as `processing_class`"
                )
            vocab_size = getattr(getattr(self._base_model(), "config", None), "vocab_size", None)
            self._vocab = Vocabulary.from_tokenizer(self.processing_class, vocab_size)
        if isinstance(self.train_dataset, MixtureDataset):
            args = self.args
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            if (self.train_dataset.samples_per_step, self.train_dataset.total_steps) != (per_step, args.max_steps):
                raise ValueError(
                    f"the mixture was built for {self.train_dataset.total_steps} steps of "
                    f"{self.train_dataset.samples_per_step} samples, but this run has {args.max_steps} steps of "
                    f"{per_step} (batch × gradient accumulation × processes)"
                )

    def data_state(self, step: int) -> DataState | None:
        """Task, row length, mask rate and mixture weights at ``step`` (None without a data plane)."""
        if self.data_plane is None or self.resolved is None:
            return None
        return self.data_plane.state_at(self.resolved, step)

    def _transform_inputs(self, inputs: dict, step: int) -> dict:
        """A pure function of (batch, phase of ``step``, seed): rows split to the phase's length, then corrupted
        for ``mlm`` / ``diffusion`` with generators seeded by (seed, step, row)."""
        state = self.data_state(step)
        if state is None or state.task in ("classification", "dpo", "kto"):  # whole rows / pairs, padded per batch
            return inputs
        if state.task == "sft":  # conversations: a shorter phase truncates them
            return truncate_for_phase(inputs, state.max_seq_length, self.data_plane.chunk_length(self.schedule))
        inputs = split_rows(inputs, state.max_seq_length)
        plane, seed = self.data_plane, self.args.seed
        if state.task == "mlm":
            ids, labels = mask_for_mlm(inputs["input_ids"], self._vocab, state.mask_rate, seed, step, plane.mask_split)
            inputs = {**inputs, "input_ids": ids, "labels": labels}
        elif state.task == "diffusion":
            ids, labels, weights = mask_for_diffusion(
                inputs["input_ids"],
                self._vocab,
                state.mask_rate,
                seed,
                step,
                plane.diffusion_min_rate,
                plane.diffusion_weighting,
            )
            inputs = {**inputs, "input_ids": ids, "labels": labels}
            if weights is not None:
                inputs["label_weights"] = weights
        return inputs

    def _transform_eval_inputs(self, inputs: dict) -> dict:
        """Eval corruption for masked tasks: ``eval_mask_rate`` of the tokens become the mask token, seeded by
        (seed, row) only, so every eval of the run masks the same positions and numbers compare across phases."""
        if self._vocab is None:
            return inputs
        rate = self.data_plane.eval_mask_rate
        ids, labels = mask_for_mlm(inputs["input_ids"], self._vocab, rate, self.args.seed, "eval", (1.0, 0.0, 0.0))
        return {**inputs, "input_ids": ids, "labels": labels}

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """Fetch the micro-batches of step ``state.global_step`` and transform them for that step.

        This runs in the main process once the step's batches are fetched (after any worker or prefetch), so
        the phase is exact; it is the start of the training step. Transforming here rather than inside
        ``training_step`` lets the loss normalization count the labels the step really has (split rows, masked
        positions) over every micro-batch and process.
        """
        if self.data_plane is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(self._transform_inputs(next(epoch_iterator), step))
            except StopIteration:
                break
        if self._vocab is None:
            return batch_samples, self._get_num_items_in_batch(batch_samples, device)
        if not batch_samples or not self.model_accepts_loss_kwargs:
            return batch_samples, None
        total = sum(_label_weights(b["labels"], b.get("label_weights")).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return batch_samples, total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Masked tasks: cross-entropy on the corrupted positions (``1/rate``-weighted for weighted diffusion),
        normalized over the whole step; counts masked-token accuracy in eval. Causal LM: the Trainer's loss."""
        if self._vocab is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        weights = _label_weights(labels, inputs.pop("label_weights", None)).flatten()
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        token_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        total = (token_loss * weights).sum()
        if num_items_in_batch is None:
            loss = total / weights.sum().clamp(min=1.0)
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1.0)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        if not model.training:
            chosen = labels != IGNORE_INDEX
            correct = (logits.argmax(-1)[chosen] == labels[chosen]).sum()
            self._masked_counts += torch.stack([correct, chosen.sum()]).cpu()
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Adds ``<prefix>_masked_accuracy`` when the eval masks (a masked task), ``<prefix>_perplexity`` when it
        does not and the loss is a causal LM's mean token cross-entropy (not DPO's); a classification run reports
        accuracy / F1 / precision / recall through ``compute_metrics``."""
        self._masked_counts = torch.zeros(2, dtype=torch.long)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._vocab is not None:
            counts = self.accelerator.reduce(self._masked_counts.to(self.args.device), reduction="sum")
            output.metrics[f"{metric_key_prefix}_masked_accuracy"] = float(counts[0]) / max(int(counts[1]), 1)
        elif self._token_loss() and output.metrics.get(f"{metric_key_prefix}_loss") is not None:
            loss = output.metrics[f"{metric_key_prefix}_loss"]
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 50.0))
        return output

    def _token_loss(self) -> bool:
        """Whether the eval loss is a mean token cross-entropy (a causal LM; not DPO's or KTO's preference loss)."""
        preference = self.data_plane is not None and self.data_plane.task in ("dpo", "kto")
        return is_causal_lm(self.model) and not preference

    def _classifies(self) -> bool:
        return self.data_plane is not None and self.data_plane.task == "classification"

    def _get_train_sampler(self, train_dataset=None):
        """A mixture is already in its seeded order: sample i must land in step i // samples_per_step."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, MixtureDataset):
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def _data_logs(self, step: int) -> dict:
        """``max_seq_length``, ``mask_rate`` (masked tasks) and ``mixture/<name>`` at ``step``."""
        state = self.data_state(step)
        if state is None:
            return {}
        logs = {"max_seq_length": state.max_seq_length}
        if state.mask_rate is not None:
            logs["mask_rate"] = round(state.mask_rate, 6)
        for name, weight in (state.mixture or {}).items():
            logs[f"mixture/{name}"] = round(weight, 6)
        return logs


def _label_weights(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token loss weights: the given ones, else 1 on every labelled position."""
    return weights if weights is not None else (labels != IGNORE_INDEX).float()
