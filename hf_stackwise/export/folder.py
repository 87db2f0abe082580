"""Export a run or checkpoint as a plain Hugging Face model folder.

The exported folder holds only the blocks that ran in the phase that produced the weights (inactive
stacks are dropped and ``config`` updated), plus the tokenizer; ``AutoModelForCausalLM.from_pretrained`` (for a
classification run ``AutoModelForSequenceClassification``, with the run's ``id2label``) loads it with no hf_stackwise
import. :func:`merge_into` writes the same model into an adapter run's own folder (the end of ``hf-stackwise train``).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from ..persist.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RUN_MANIFEST_NAME,
    last_complete_checkpoint,
    read_json,
    run_task,
)
from ..persist.weights import TRAINABLE_WEIGHTS_NAME, UNARRANGED, is_unarranged, load_trainable
from ..rack.adapters import attach_adapters
from ..rack.growth import allocate
from ..rack.rack import BASE_LAYERS_KEY, per_layer_config_keys
from ..report.card import write_card
from ..schedule.layout import stack_sizes
from ..schedule.phases import Schedule, StackwiseError

logger = logging.get_logger(__name__)


class ExportError(StackwiseError):
    """The source is not an exportable run/checkpoint, or the target must not be written."""


def find_source(path: str) -> str:
    """The folder to export: a checkpoint, or a run's final model (else its last complete checkpoint)."""
    if not os.path.isdir(path):
        hint = " (it looks like a recipe: train it first)" if path.endswith((".yaml", ".yml")) else ""
        raise ExportError(
            f"export: {path!r} is not a directory{hint}; give a run's output_dir or one of its checkpoint-N folders"
        )
    has_model = any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", TRAINABLE_WEIGHTS_NAME))
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)) and has_model:
        return path
    if os.path.isfile(os.path.join(path, RUN_MANIFEST_NAME)):
        checkpoint = last_complete_checkpoint(path)
        if checkpoint is not None:
            return checkpoint
        raise ExportError(f"export: run {path!r} has no saved model yet (no final model, no complete checkpoint)")
    raise ExportError(
        f"export: {path!r} is not an hf_stackwise run or checkpoint (no {MANIFEST_NAME} or {RUN_MANIFEST_NAME} "
        "next to a model); give a run's output_dir or a checkpoint-N folder"
    )


def read_manifest(folder: str) -> dict:
    """The checkpoint manifest, refused when it is unreadable or written by another version of the format."""
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise ExportError(f"export: cannot read {path}: {err}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or not isinstance(manifest.get("run"), dict):
        raise ExportError(
            f"export: {path} has format version {version!r}, and this hf_stackwise reads version {FORMAT_VERSION}; "
            "export it with the hf_stackwise version that trained it"
        )
    return manifest


def _layout(manifest: dict):
    run = manifest["run"]
    boundaries = run["rack"]["boundaries"]
    return Schedule.from_list(run["schedule"]).layout(stack_sizes(boundaries))


def active_blocks(manifest: dict) -> list[int]:
    """Blocks of the saved model, bottom → top, that ran in the phase that produced the weights (a final save of a
    full-weight run stores exactly those, in that order)."""
    if manifest.get("weights") == "arranged" and not (manifest["run"].get("adapters") or {}):
        return list(range(len(manifest["phase"]["blocks"])))
    if "blocks" in manifest["phase"]:
        return list(manifest["phase"]["blocks"])
    boundaries = manifest["run"]["rack"]["boundaries"]  # manifests written before growth existed
    phase = Schedule.from_list(manifest["run"]["schedule"]).phases[manifest["phase"]["index"]]
    return list(range(boundaries[phase.active_depth(len(boundaries) - 1)]))


def select_blocks(model, layers_path: str, blocks: list[int]) -> None:
    """Keep the physical blocks ``blocks`` in that order and make the config agree (``num_hidden_layers``,
    per-layer lists); a plain model folder then renumbers the layers when it loads."""
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    physical = getattr(parent, attr)
    config = model.config
    config.__dict__.pop(BASE_LAYERS_KEY, None)
    if blocks == list(range(len(physical))):
        return
    for key in per_layer_config_keys(config, len(physical)):
        value = getattr(config, key)
        setattr(config, key, [value[b] for b in blocks])
    setattr(parent, attr, type(physical)([physical[b] for b in blocks]))
    config.num_hidden_layers = len(blocks)


def model_class(manifest: dict):
    """The auto class of the run's task (the manifest keeps the data plane): sequence classification or causal LM."""
    return AutoModelForSequenceClassification if run_task(manifest) == "classification" else AutoModelForCausalLM


def load_merged(folder: str, manifest: dict):
    """The trained model as a plain transformers model: adapters merged into a full-precision base."""
    plan = manifest["run"].get("adapters") or {}
    auto_class = model_class(manifest)
    if not plan:
        return auto_class.from_pretrained(folder, dtype="auto", variant=_variant(folder))
    peft_model = load_adapted(folder, manifest, dequantize=True)
    return peft_model.merge_and_unload()


def _variant(folder: str) -> str | None:
    return UNARRANGED if is_unarranged(folder) else None


def load_adapted(folder: str, manifest: dict, dequantize: bool):
    """The run's base (full precision; a 4-bit base re-created and dequantized when ``dequantize``, else loaded
    unquantized), grown as the run grew it, with every adapter attached and every trained tensor loaded."""
    plan = manifest["run"]["adapters"]
    auto_class = model_class(manifest)
    base = manifest.get("base_model")
    if not base or (not os.path.exists(base) and base.count("/") != 1):  # neither a local folder nor a Hub id
        raise ExportError(
            f"export: the base model of {folder!r} ({base!r}) is not available to merge the adapters into"
        )
    quantization = manifest.get("quantization") if dequantize else None
    labels = _label_kwargs(manifest)  # a classifier: the run's label set, so the head has the trained shape
    if quantization:  # re-create the same 4-bit base, then dequantize it: merge in full precision
        from transformers import BitsAndBytesConfig

        from ..rack.quantization import disable_cpu_repack

        config = BitsAndBytesConfig.from_dict(quantization)
        model = auto_class.from_pretrained(base, dtype=torch.float32, quantization_config=config, **labels)
        disable_cpu_repack(model)
        model = model.dequantize()
    else:
        model = auto_class.from_pretrained(base, dtype=torch.float32, **labels)
    layers = manifest["run"]["rack"]["layers"]
    layout = _layout(manifest)
    if layout.grows:
        allocate(model, layers, layout)
    peft_model = attach_adapters(model, plan, layers)
    load_trainable(peft_model, os.path.join(folder, TRAINABLE_WEIGHTS_NAME))
    return peft_model


def _label_kwargs(manifest: dict) -> dict:
    """``from_pretrained`` config overrides that give a classification base the run's label set and pad id."""
    classifier = manifest.get("classifier")
    if not classifier:
        return {}
    id2label = {int(i): name for i, name in classifier["id2label"].items()}
    kwargs = {"num_labels": len(id2label), "id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    if classifier.get("pad_token_id") is not None:
        kwargs["pad_token_id"] = classifier["pad_token_id"]
    return kwargs


def write_adapters(folder: str, manifest: dict, target: str) -> None:
    """PEFT adapter folders (``adapter_config.json`` + safetensors, one per adapter) and a rack manifest."""
    run = manifest["run"]
    plan = run.get("adapters") or {}
    if not plan:
        raise ExportError(f"export --adapters: {folder!r} trained no LoRA adapter; export the merged model instead")
    layout = _layout(manifest)
    if layout.grows:
        raise ExportError(
            f"export --adapters: {folder!r} grew the rack, and the new blocks are not part of the base model any "
            "adapter applies to; export the merged model instead"
        )
    own = sorted(u for u in Schedule.from_list(run["schedule"]).ever_trainable_units(layout.sizes) if "." not in u)
    if own:
        raise ExportError(
            f"export --adapters: the run trains {', '.join(own)} with their own weights (`adapter: full`, "
            "`embeddings`/`head: train`), which no adapter holds; export the merged model instead"
        )
    load_adapted(folder, manifest, dequantize=False).save_pretrained(target)  # one subfolder per adapter
    if os.path.isfile(os.path.join(target, "README.md")):
        os.remove(os.path.join(target, "README.md"))  # PEFT's card; the export writes its own
    rack = {
        "base_model": manifest.get("base_model"),
        "quantization": manifest.get("quantization"),
        "rack": run["rack"],
        "adapters": plan,
        "active_blocks": active_blocks(manifest),
        "phase": manifest["phase"],
        "load": "PeftModel.from_pretrained(base, '<folder>/<first>', adapter_name='<first>'), then "
        "load_adapter('<folder>/<name>', adapter_name='<name>') for the others, then "
        "base_model.set_adapter([every name])",
    }
    with open(os.path.join(target, "stackwise_adapters.json"), "w") as f:
        json.dump(rack, f, indent=2)


def merge_into(folder: str) -> None:
    """Write the merged plain model (as :func:`export` does) into an adapter run's own ``folder``, beside its trained
    tensors; the folder then loads with ``from_pretrained`` as the trained function."""
    manifest = read_manifest(folder)
    model = load_merged(folder, manifest)
    select_blocks(model, manifest["run"]["rack"]["layers"], active_blocks(manifest))
    model.save_pretrained(folder)


def export(
    source: str, output_dir: str, overwrite: bool = False, adapters: bool = False, name: str | None = None
) -> str:
    """Write ``source`` (run or checkpoint) to ``output_dir`` as a plain model folder (or, with ``adapters``, as
    PEFT adapter folders plus a rack manifest) with a model card titled ``name`` (default: the folder's name);
    returns the folder exported."""
    folder = find_source(source)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(
            f"export: {output_dir!r} is not empty; pass --overwrite to replace it, or pick another folder"
        )
    manifest = read_manifest(folder)
    tmp = output_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters:
        write_adapters(folder, manifest, tmp)
    else:
        model = load_merged(folder, manifest)
        select_blocks(model, manifest["run"]["rack"]["layers"], active_blocks(manifest))
        model.save_pretrained(tmp)
    try:
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    except (OSError, ValueError):
        logger.warning(f"export: {folder} has no tokenizer; the exported folder has none either")
    write_card(folder, tmp, manifest, adapters=adapters, name=name or os.path.basename(os.path.abspath(output_dir)))
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return folder
