"""The YAML recipe: sections ``model``, ``rack``, ``adapters``, ``data``, ``schedule``, ``training``, ``callbacks``,
``cache``.

``load_recipe`` reads a file, applies command-line overrides (``--training.max_steps 10``) and
validates the whole recipe statically (keys, types, schedule), raising one :class:`RecipeError` that
lists every problem with its key path. Each section is parsed here once, into the typed, frozen sections of
:mod:`hf_stackwise.recipe.sections`. Checks that need the model's config (layer counts) or the data
happen in :mod:`hf_stackwise.cli.pipeline`, still before any weight is loaded.
"""

from __future__ import annotations

import copy
import os
import re

import yaml

from ..cache.policy import CacheSettings
from ..data import labels
from ..data.plane import check_data_plane
from ..data.preference_recipe import check_preference_recipe
from ..data.sft_recipe import SFT_KEYS, check_sft_recipe
from ..persist.checkpoint import RECIPE_NAME, RUN_MANIFEST_NAME
from ..schedule.phases import LORA_KEYS, TASKS, RecipeError, Schedule, check_lora, phase_defaults
from .callbacks import check_callbacks
from .sections import (
    FROM_PRETRAINED_KEYS,
    DataSection,
    ModelSection,
    RackSection,
    Recipe,
    Section,
    TrainingSection,
)

SECTIONS = ("model", "rack", "adapters", "data", "schedule", "training", "callbacks", "cache")


class RecipeLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: ``1e-5`` is a number (PyYAML's YAML 1.1 reads it as a string)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text):
    """Parse recipe YAML (a string or an open file) with :class:`RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


ADAPTERS_KEYS = (*LORA_KEYS, "trunk_r", "trunk_alpha")
MODEL_KEYS = ("name_or_path", "dtype", "quantization", "from_scratch", "config")
QUANTIZATION_KEYS = ("bits", "quant_type", "double_quant", "compute_dtype", "quant_storage")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RACK_KEYS = ("blocks_per_stack", "boundaries", "layers")
DATA_KEYS = (
    "train",
    "eval",
    "eval_fraction",
    "text_column",
    "max_seq_length",
    "task",
    "max_eval_samples",
    "datasets",
    "mask_rate",
    "mask_split",
    "eval_mask_rate",
    "diffusion_min_rate",
    "diffusion_weighting",
    *SFT_KEYS,  # data.task: sft (hf_stackwise.data.sft)
    *labels.KEYS,
)
# TrainingArguments fields the recipe sets elsewhere, with where they belong instead.
TRAINING_OWNED_ELSEWHERE = {
    "schedule": "the top-level `schedule:` section",
    "blocks_per_stack": "`rack.blocks_per_stack`",
    "stack_boundaries": "`rack.boundaries`",
    "rack_layers": "`rack.layers`",
    "lr_scheduler_type": "`lr_schedule` (and `lr_schedule_kwargs`) on each phase: any transformers step schedule",
    "lr_scheduler_kwargs": "`lr_schedule_kwargs` (with `lr_schedule` and `warmup`) on each phase",
    "warmup_ratio": "`warmup` on each phase (a fraction of the phase)",
    "warmup_steps": "`warmup` on each phase (a fraction of the phase)",
    "data_plane": "the top-level `data:` section and the phases' data fields",
    "activation_cache": "the top-level `cache:` section",
}


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """``["--training.max_steps", "10", "--schedule.0.until=0.5"]`` → ``[(key, value), ...]`` (YAML-typed)."""
    pairs = []
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise RecipeError(f"override {item!r}: expected `--section.key value` (e.g. `--training.max_steps 10`)")
        key = item[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        elif i + 1 < len(items):
            text = items[i + 1]
            i += 2
        else:
            raise RecipeError(f"override --{key}: missing its value")
        pairs.append((key, load_yaml(text)))
    return pairs


def apply_overrides(raw: dict, overrides: list[tuple[str, object]]) -> dict:
    """Set dotted keys (``schedule.1.until``) in a copy of the raw recipe."""
    data = copy.deepcopy(raw)
    for key, value in overrides:
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override --{key}: {path} is not an index of a list of {len(node)}")
                node = node[int(part)]
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"override --{key}: {last} is not an index of a list of {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"override --{key}: {'.'.join(parts[:-1])} is not a section")
    return data


def _check_keys(section: dict, allowed: tuple[str, ...], path: str, problems: list[str]) -> None:
    for key in section:
        if key not in allowed:
            problems.append(f"{path}.{key}: unknown key; known keys are {', '.join(allowed)}")


def _check_model(model, problems: list[str]) -> dict:
    if not isinstance(model, dict):
        problems.append("model: expected a mapping with at least `name_or_path`")
        return {}
    _check_keys(model, MODEL_KEYS + FROM_PRETRAINED_KEYS, "model", problems)
    name = model.get("name_or_path")
    if not isinstance(name, str) or not name:
        problems.append("model.name_or_path: missing; give a local model folder or a Hub id")
    dtype = model.get("dtype", "auto")
    if dtype not in DTYPES:
        problems.append(f"model.dtype: {dtype!r} is not one of {DTYPES}")
    from_scratch = model.get("from_scratch", False)
    if not isinstance(from_scratch, bool):
        problems.append(f"model.from_scratch: {from_scratch!r} is not true/false")
    overrides = model.get("config")
    if overrides is not None and not isinstance(overrides, dict):
        problems.append(f"model.config: {overrides!r} is not a mapping of config settings (e.g. num_hidden_layers: 4)")
    quant = model.get("quantization")
    if quant is not None and from_scratch is True:
        problems.append("model.quantization: a `from_scratch` model has no pretrained weights to quantize; drop one")
    if quant is not None:
        if not isinstance(quant, dict):
            problems.append("model.quantization: expected {bits: 4, quant_type: nf4, double_quant: true} or null")
        else:
            _check_keys(quant, QUANTIZATION_KEYS, "model.quantization", problems)
            if quant.get("bits", 4) != 4:
                problems.append(f"model.quantization.bits: {quant.get('bits')!r}; only 4-bit (QLoRA) is supported")
            if quant.get("quant_type", "nf4") not in ("nf4", "fp4"):
                problems.append(f"model.quantization.quant_type: {quant.get('quant_type')!r} is not nf4 or fp4")
            if not isinstance(quant.get("double_quant", True), bool):
                problems.append(f"model.quantization.double_quant: {quant.get('double_quant')!r} is not true/false")
            if quant.get("quant_storage", "auto") not in ("auto", "uint8", "float32", "bfloat16", "float16"):
                problems.append(
                    f"model.quantization.quant_storage: {quant.get('quant_storage')!r} is not auto, uint8, float32, "
                    "bfloat16 or float16 (auto: the dtype FSDP2 shards in, uint8 otherwise)"
                )
            if quant.get("compute_dtype", "float32") not in ("float32", "bfloat16", "float16"):
                problems.append(
                    f"model.quantization.compute_dtype: {quant.get('compute_dtype')!r} is not float32, bfloat16 "
                    "or float16"
                )
    return model


def _check_rack(rack, problems: list[str]) -> dict:
    if rack is None:
        return {}
    if not isinstance(rack, dict):
        problems.append("rack: expected a mapping (blocks_per_stack, boundaries, layers)")
        return {}
    _check_keys(rack, RACK_KEYS, "rack", problems)
    bps = rack.get("blocks_per_stack")
    if bps is not None and (not isinstance(bps, int) or isinstance(bps, bool) or bps < 1):
        problems.append(f"rack.blocks_per_stack: {bps!r} is not a positive integer")
    bounds = rack.get("boundaries")
    if bounds is not None and (
        not isinstance(bounds, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
    ):
        problems.append(f"rack.boundaries: {bounds!r} is not a list of block indices")
    if bps is not None and bounds is not None:
        problems.append("rack: give either `blocks_per_stack` or `boundaries`, not both")
    layers = rack.get("layers")
    if layers is not None and not isinstance(layers, str):
        problems.append(f"rack.layers: {layers!r} is not a dotted path such as `model.layers`")
    return rack


def _check_adapters(section, problems: list[str]) -> dict:
    """The ``adapters:`` section: LoRA defaults for every phase that asks for LoRA, and the trunk adapter's rank."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        problems.append(f"adapters: expected a mapping with keys among {', '.join(ADAPTERS_KEYS)}")
        return {}
    _check_keys(section, ADAPTERS_KEYS, "adapters", problems)
    check_lora({k: v for k, v in section.items() if k in LORA_KEYS}, "adapters", problems)
    trunk_r, trunk_alpha = section.get("trunk_r"), section.get("trunk_alpha")
    if trunk_r is not None and (not isinstance(trunk_r, int) or isinstance(trunk_r, bool) or trunk_r < 1):
        problems.append(f"adapters.trunk_r: {trunk_r!r} is not a positive integer (the trunk adapter's rank)")
    if trunk_alpha is not None and (
        not isinstance(trunk_alpha, (int, float)) or isinstance(trunk_alpha, bool) or trunk_alpha <= 0
    ):
        problems.append(f"adapters.trunk_alpha: {trunk_alpha!r} is not a positive number")
    return section


def _check_dataset_spec(spec, path: str, problems: list[str]) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        problems.append(
            f"{path}: expected `datasets.load_dataset` arguments with at least `path`, "
            'e.g. {path: text, data_files: "corpus/*.txt"}'
        )


def _check_data(data, problems: list[str]) -> dict:
    if not isinstance(data, dict):
        problems.append("data: expected a mapping with at least `train` (datasets.load_dataset arguments)")
        return {}
    _check_keys(data, DATA_KEYS, "data", problems)
    if data.get("datasets") is not None and not isinstance(data["datasets"], dict):
        problems.append(
            f"data.datasets: {data['datasets']!r} is not a mapping of source names to `datasets.load_dataset` "
            "arguments (e.g. {docs: {path: text, data_files: docs.txt}})"
        )
    elif isinstance(data.get("datasets"), dict) and data["datasets"]:
        if data.get("train") is not None:
            problems.append("data: give either `train` or named `datasets` (a mixture), not both")
        for name, spec in data["datasets"].items():
            _check_dataset_spec(spec, f"data.datasets.{name}", problems)
    else:
        _check_dataset_spec(data.get("train"), "data.train", problems)
    if data.get("eval") is not None:
        _check_dataset_spec(data["eval"], "data.eval", problems)
    fraction = data.get("eval_fraction", 0.0)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        problems.append(f"data.eval_fraction: {fraction!r} is not a fraction in [0, 1)")
    if data.get("eval") is not None and fraction:
        problems.append("data: give either `eval` or `eval_fraction`, not both")
    for key in ("max_seq_length", "max_eval_samples"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"data.{key}: {value!r} is not a positive integer")
    if not isinstance(data.get("text_column", "text"), str):
        problems.append(f"data.text_column: {data.get('text_column')!r} is not a column name")
    if data.get("task", "clm") not in TASKS:
        problems.append(f"data.task: {data.get('task')!r} is not one of {TASKS}")
    return data


def _check_training(training, problems: list[str]) -> dict:
    if not isinstance(training, dict):
        problems.append("training: expected a mapping of TrainingArguments fields with at least `output_dir`")
        return {}
    for key, where in TRAINING_OWNED_ELSEWHERE.items():
        if key in training:
            problems.append(f"training.{key}: set by the schedule; use {where}")
    if not isinstance(training.get("output_dir"), str) or not training["output_dir"].strip():
        problems.append("training.output_dir: missing; say where checkpoints and the final model go")
    return training


def validate_recipe(raw, path: str | None = None) -> Recipe:
    """Validate a raw recipe mapping statically; raise one RecipeError listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a YAML mapping with sections {', '.join(SECTIONS)}")
    problems: list[str] = []
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section; known sections are {', '.join(SECTIONS)}")
    for key in ("model", "data", "schedule", "training"):
        if key not in raw:
            problems.append(f"{key}: missing section")
    model = _check_model(raw.get("model"), problems) if "model" in raw else {}
    rack = _check_rack(raw.get("rack"), problems)
    adapters = _check_adapters(raw.get("adapters"), problems)
    data = _check_data(raw.get("data"), problems) if "data" in raw else {}
    training = _check_training(raw.get("training"), problems) if "training" in raw else {}
    schedule = None
    if "schedule" in raw:
        try:
            task = data.get("task") if isinstance(data, dict) else None
            schedule = Schedule.from_list(raw["schedule"], phase_defaults(task if task in TASKS else None))
        except RecipeError as err:
            problems.extend(err.problems)
    if problems:
        raise RecipeError(problems)
    check_data_plane(data, schedule, problems)
    check_sft_recipe(data, schedule, problems)
    check_preference_recipe(data, schedule, problems)
    labels.check_recipe(data, schedule, problems)
    callbacks = check_callbacks(raw.get("callbacks"), data, schedule, training, problems)
    cache = None
    try:
        cache = CacheSettings.from_dict(raw.get("cache"))
    except RecipeError as err:
        problems.extend(err.problems)
    if schedule is not None and model.get("quantization") and not schedule.uses_lora():
        problems.append(
            "model.quantization: a 4-bit base trains through LoRA; give a phase `trunk: lora` or `adapter: lora`, "
            "or set `model.quantization: null`"
        )
    if schedule is not None and adapters and not schedule.uses_lora():
        problems.append("adapters: LoRA settings given, but no phase uses `adapter: lora` or `trunk: lora`")
    if problems:
        raise RecipeError(problems)
    return Recipe(
        model=ModelSection.parse(model),
        rack=RackSection.parse(rack),
        adapters=Section(adapters),
        data=DataSection.parse(data),
        schedule=schedule,
        training=TrainingSection.parse(training),
        raw=raw,
        path=path,
        callbacks=Section(callbacks),
        cache=cache,
    )


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and statically validate a recipe file."""
    if os.path.isfile(os.path.join(path, RUN_MANIFEST_NAME)):
        raise RecipeError(
            f"recipe: {path!r} is a run folder, not a recipe; the recipe it ran is "
            f"{os.path.join(path, RECIPE_NAME)} (runs started by `hf-stackwise train` keep it)"
        )
    if not os.path.isfile(path):
        raise RecipeError(f"recipe: {path!r} is not a file; give the path of a YAML recipe")
    with open(path) as f:
        try:
            raw = load_yaml(f)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe: {path!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if isinstance(raw, dict) and "format_version" in raw:
        raise RecipeError(
            f"recipe: {path!r} is an hf_stackwise run or checkpoint manifest, not a recipe; give the YAML recipe "
            f"(a run folder keeps it as {RECIPE_NAME})"
        )
    if overrides:
        raw = apply_overrides(raw or {}, parse_overrides(overrides))
    return validate_recipe(raw, path)
