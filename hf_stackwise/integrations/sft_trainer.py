"""The stackwise trainer and arguments combined with TRL's ``SFTTrainer`` / ``SFTConfig`` (``data.task: sft``;
see :mod:`hf_stackwise.data.sft` for the data). Importing this module imports trl."""

from __future__ import annotations

import dataclasses

import torch
import trl
from transformers.utils import logging

from ..data.mixture import MixtureDataset
from ..schedule.phases import RecipeError
from ..trainer import StackwiseArguments, StackwiseTrainer

logger = logging.get_logger(__name__)

__all__ = ["StackwiseSFTConfig", "StackwiseSFTTrainer"]


@dataclasses.dataclass
class StackwiseSFTConfig(StackwiseArguments, trl.SFTConfig):
    """``trl.SFTConfig`` + the schedule. TrainingArguments' defaults are kept where TRL changes them
    (gradient checkpointing off, no bf16, logging every 500 steps, lr 5e-5), so a recipe's ``training:``
    means the same for every task."""

    learning_rate: float = 5e-5
    logging_steps: float = 500
    gradient_checkpointing: bool | None = None  # TrainingArguments: None, i.e. off (TRL: True)
    bf16: bool | None = False


class StackwiseSFTTrainer(StackwiseTrainer, trl.SFTTrainer):
    """``StackwiseTrainer`` over TRL's ``SFTTrainer``. A :class:`MixtureDataset` of untokenized sources is
    accepted: TRL prepares each source (as its ``evaluate`` prepares a dataset passed later) and the mixture
    reads the prepared rows."""

    def __init__(self, model=None, args=None, train_dataset=None, **kwargs):
        mixture = train_dataset if isinstance(train_dataset, MixtureDataset) else None
        if mixture is not None:  # TRL takes a datasets.Dataset: build with one row, then swap the mixture in
            train_dataset = next(iter(mixture.sources.values())).select(range(1))
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self._keep_adapter_dtype()
        if hasattr(self.train_dataset, "__len__") and len(self.train_dataset) == 0:
            raise RecipeError(
                "data.max_seq_length: no training row keeps a completion token after truncation to "
                f"{self.args.max_length} tokens; raise `data.max_seq_length` or shorten the prompts"
            )
        if mixture is not None:
            sources = {
                name: self._prepare_dataset(
                    source, self.processing_class, self.args, self.args.packing, None, f"train/{name}"
                )
                for name, source in mixture.sources.items()
            }
            self.train_dataset = mixture.with_sources(sources)
            self._init_data_plane()
        if self.args.packing:
            self._check_packed_isolation()

    def _keep_adapter_dtype(self) -> None:
        keep_adapter_dtype(self._base_model(), self.model)

    def _check_packed_isolation(self) -> None:
        """Whether packed examples attend to each other: run two short sequences packed (position ids
        restarting, no attention mask) and alone; warn when the second one's logits differ."""
        model = self._base_model()
        device = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(0)
        first, second = (torch.randint(0, vocab, (1, 5), generator=generator).to(device) for _ in range(2))
        packed = torch.cat([first, second], dim=1)
        positions = torch.cat([torch.arange(5), torch.arange(5)])[None].to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.arranged():
            together = model(input_ids=packed, position_ids=positions).logits[:, 5:].float()
            alone = model(input_ids=second).logits.float()
        model.train(was_training)
        self.packing_isolated = torch.allclose(together, alone, atol=1e-4, rtol=1e-3)
        implementation = getattr(model.config, "_attn_implementation", None)
        if self.packing_isolated:
            logger.info(f"[hf_stackwise] packing: packed examples do not attend to each other ({implementation})")
        else:
            logger.warning(
                f"[hf_stackwise] data.packing: with {type(model).__name__} and attention {implementation!r}, "
                "packed examples attend to each other (the position ids restart per example, but the attention "
                "mask does not separate them); use an attention implementation that does, or `packing: false`"
            )


def keep_adapter_dtype(base, model) -> None:
    """TRL casts a quantized base's trainable tensors to bf16 (the QLoRA paper's choice); keep the recipe's compute
    dtype instead, as the plain stackwise trainer does."""
    config = getattr(base.config, "quantization_config", None)
    dtype = (
        config.get("bnb_4bit_compute_dtype")
        if isinstance(config, dict)
        else getattr(config, "bnb_4bit_compute_dtype", None)
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None or dtype == torch.bfloat16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.to(dtype)
