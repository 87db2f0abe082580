"""The weight files of a run's folders, below both the trainer (which writes them) and export (which reads them).

Every folder hf_stackwise writes either loads in plain transformers as the trained function, or does not load as a
model at all:

- a checkpoint whose blocks are the function in storage order (no growth, full depth) is a normal Trainer checkpoint;
- any other checkpoint of a full-weight run keeps every allocated block in storage order (what resume needs) under
  the weights variant ``unarranged`` (``model.unarranged.safetensors``): ``from_pretrained`` finds no
  ``model.safetensors`` and raises, resume and ``hf-stackwise export`` read the variant;
- adapter runs keep ``stackwise_trainable.safetensors`` (every ever-trainable tensor: adapters, fully trained and
  grown stacks) and no PEFT adapter folder, which PEFT would load as one adapter of several, a different model.
"""

from __future__ import annotations

import json
import os
import shutil

import safetensors.torch
import torch
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .checkpoint import ResumeError

TRAINABLE_WEIGHTS_NAME = "stackwise_trainable.safetensors"  # every ever-trainable tensor (adapter runs)
UNARRANGED = "unarranged"  # weights variant of a checkpoint whose storage order is not the function


def _variant(name: str) -> str:
    path, ext = name.rsplit(".", 1)
    return f"{path}.{UNARRANGED}.{ext}"


def is_unarranged(folder: str) -> bool:
    """Whether ``folder`` holds its weights under the ``unarranged`` variant."""
    return any(os.path.isfile(os.path.join(folder, _variant(n))) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))


def hide_weights(folder: str) -> None:
    """Rename a freshly saved ``model.safetensors`` (or its shard index) to the ``unarranged`` variant: the folder
    keeps its config and every tensor, and plain ``from_pretrained`` no longer finds a model in it."""
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.replace(path, os.path.join(folder, _variant(name)))


def load_unarranged(model: torch.nn.Module, folder: str) -> None:
    """Copy an ``unarranged`` checkpoint's tensors into ``model`` in place (bitwise; tied copies are not stored)."""
    index = os.path.join(folder, _variant(SAFE_WEIGHTS_INDEX_NAME))
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [_variant(SAFE_WEIGHTS_NAME)]
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for name in files:
        tensors = safetensors.torch.load_file(os.path.join(folder, name))
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise ResumeError(
                f"training.resume_from_checkpoint: {folder} holds {unexpected[0]}, which this model lacks"
            )
        model.load_state_dict(tensors, strict=False)
        loaded |= set(tensors)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    missing = sorted(expected - loaded - tied)
    if missing:
        raise ResumeError(
            f"training.resume_from_checkpoint: {folder} lacks {missing[0]}; the checkpoint is incomplete"
        )


def save_trainable(tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Write ``stackwise_trainable.safetensors`` atomically."""
    path = os.path.join(folder, TRAINABLE_WEIGHTS_NAME)
    safetensors.torch.save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


def load_trainable(model: torch.nn.Module, path: str) -> None:
    """Copy the tensors of a ``stackwise_trainable.safetensors`` file into ``model`` (names must all exist)."""
    if not os.path.isfile(path):
        raise ResumeError(f"training.resume_from_checkpoint: {path} is missing; the checkpoint is incomplete")
    tensors = safetensors.torch.load_file(path)
    params = dict(model.named_parameters())
    missing = [name for name in tensors if name not in params]
    if missing:
        raise ResumeError(f"training.resume_from_checkpoint: {path} holds {missing[0]}, which this model lacks")
    with torch.no_grad():
        for name, tensor in tensors.items():
            copy_full(params[name], tensor)


def copy_full(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a full tensor into a parameter; an FSDP2-sharded one (a ``DTensor``) keeps its own rank's shard."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(tensor)


MODEL_FILES = (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)


def remove_model_files(folder: str, adapters=()) -> None:
    """Remove what ``from_pretrained`` would load from ``folder`` (config, weights and their shards, adapter files
    and the named adapter subfolders), so a folder that holds no model of this run loads none of an earlier one."""
    for name in MODEL_FILES:
        path = os.path.join(folder, name)
        if name.endswith(".index.json") and os.path.isfile(path):
            with open(path) as f:
                for shard in set(json.load(f).get("weight_map", {}).values()):
                    if os.path.isfile(os.path.join(folder, shard)):
                        os.remove(os.path.join(folder, shard))
        if os.path.isfile(path):
            os.remove(path)
    for name in adapters:
        if os.path.isfile(os.path.join(folder, name, ADAPTER_CONFIG_NAME)):
            shutil.rmtree(os.path.join(folder, name))
