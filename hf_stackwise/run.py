"""From a recipe to a trained model. Every check that needs the model's config or the data runs
before a weight is loaded and before the output directory is touched (``product.md``, principle 7).
"""

from __future__ import annotations

import enum
import math
import os
import types
import typing
from dataclasses import dataclass, fields

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback, default_data_collator

from .adapters import plan_adapters, resolve_targets
from .checkpoint import RECIPE_NAME, check_output_dir, check_resumable, resolve_resume, run_identity
from .data import build_datasets
from .quantization import (
    bnb_config,
    disable_cpu_repack,
    full_precision_modules,
    quantization_identity,
    require_bitsandbytes,
)
from .rack import find_layers_path, resolve_boundaries
from .recipe import FROM_PRETRAINED_KEYS, Recipe
from .schedule import RecipeError
from .trainer import StackwiseArguments, StackwiseTrainer

TOKENIZER_KEYS = ("revision", "subfolder", "trust_remote_code", "gguf_file", "local_files_only", "cache_dir")


@dataclass
class Prepared:
    """Everything a run needs except the weights."""

    recipe: Recipe
    args: StackwiseArguments
    config: object
    tokenizer: object
    train_dataset: object
    eval_dataset: object
    rack: dict
    skip_modules: list[str]
    total_steps: int
    resume_from_checkpoint: str | None


def _matches(value, hint) -> bool:
    """Whether a YAML value fits a dataclass annotation (unknown annotations are left to TrainingArguments)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def build_arguments(recipe: Recipe) -> StackwiseArguments:
    """``StackwiseArguments`` from the recipe's ``training`` section plus its schedule and rack."""
    training = {k: v for k, v in recipe.training.items() if k != "resume_from_checkpoint"}
    known = {f.name for f in fields(StackwiseArguments) if f.init}
    unknown = [k for k in training if k not in known]
    if unknown:
        raise RecipeError([f"training.{k}: not a TrainingArguments field; check the spelling" for k in unknown])
    hints = typing.get_type_hints(StackwiseArguments)
    for key, value in training.items():
        # YAML 1.1 reads `save_strategy: no` as false: mean the string where the field takes no boolean
        if value is False and key in hints and not _matches(False, hints[key]) and _matches("no", hints[key]):
            training[key] = "no"
    wrong = [
        f"training.{k}: {v!r} is not of type {_type_name(hints[k])}"
        for k, v in training.items()
        if k in hints and not _matches(v, hints[k])
    ]
    if wrong:
        raise RecipeError(wrong)
    try:
        return StackwiseArguments(
            **training,
            schedule=recipe.raw["schedule"],
            blocks_per_stack=recipe.rack.get("blocks_per_stack"),
            stack_boundaries=recipe.rack.get("boundaries"),
            rack_layers=recipe.rack.get("layers"),
            adapters=recipe.adapters or None,
        )
    except RecipeError:
        raise
    except (TypeError, ValueError) as err:
        raise RecipeError(f"training: {err}") from None


def _model_kwargs(recipe: Recipe, keys) -> dict:
    return {k: recipe.model[k] for k in keys if k in recipe.model}


def load_config(recipe: Recipe):
    path = os.path.expanduser(recipe.model["name_or_path"])
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not os.path.exists(path):
        raise RecipeError(
            f"model.name_or_path: {path!r} does not exist; give a local model folder or a Hub id like `org/name`"
        )
    try:
        return AutoConfig.from_pretrained(path, **_model_kwargs(recipe, FROM_PRETRAINED_KEYS))
    except (OSError, ValueError) as err:
        raise RecipeError(f"model.name_or_path: cannot load the config of {path!r}: {err}") from None


def meta_model(config):
    """The model built on the meta device: every module and parameter shape, no memory, no weights."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise RecipeError(
            f"data.task: `clm` needs a causal-LM architecture, and {config.model_type!r} has none ({err})"
        ) from None


def rack_from_config(recipe: Recipe, config) -> tuple[dict, list[str], dict]:
    """Find the block list on a weightless (meta-device) copy of the model and lay out the stacks.

    Returns the rack topology, the modules to keep out of 4-bit, and the LoRA adapter plan (checked against
    the real layers of the blocks each adapter covers)."""
    skeleton = meta_model(config)
    layers = find_layers_path(skeleton, recipe.rack.get("layers"))
    blocks = skeleton.get_submodule(layers)
    boundaries = resolve_boundaries(len(blocks), recipe.rack.get("blocks_per_stack"), recipe.rack.get("boundaries"))
    recipe.schedule.validate_rack(len(boundaries) - 1)
    plan = plan_adapters(recipe.schedule, recipe.adapters, boundaries) if recipe.schedule.uses_lora() else {}
    resolve_targets(plan, blocks)
    skip = full_precision_modules(skeleton, layers, recipe.schedule, boundaries)
    return {"layers": layers, "num_blocks": boundaries[-1], "boundaries": list(boundaries)}, skip, plan


def planned_total_steps(args: StackwiseArguments, num_examples: int | None) -> int:
    """Optimizer steps of the run, as the Trainer will compute them (max_steps, or epochs × steps per epoch)."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    if num_examples is None:
        raise RecipeError(
            "training.max_steps: the training data is streamed, so epochs give no step count and phase "
            "boundaries cannot be placed; set `training.max_steps`"
        )
    batches = math.ceil(num_examples / (args.per_device_train_batch_size * max(1, args.world_size)))
    per_epoch = max(
        batches // args.gradient_accumulation_steps + int(batches % args.gradient_accumulation_steps > 0), 1
    )
    return math.ceil(args.num_train_epochs * per_epoch)


SHARDED_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def refuse_sharding(recipe: Recipe) -> None:
    """FSDP / DeepSpeed shard parameters and optimizer state by the trainable set at wrap time; phases change it."""
    asked = [name for key, name in SHARDED_ENV.items() if os.environ.get(key, "").lower() in ("1", "true")]
    asked += [key for key in ("fsdp", "deepspeed") if recipe.training.get(key)]
    if asked:
        raise RecipeError(
            f"training: {' / '.join(asked)} requested (by the recipe or the accelerate config), but phase "
            "transitions change which parameters train, and sharded optimizers fix that set when they wrap the "
            "model; launch with DDP instead (recipes/accelerate/multi_gpu_ddp.yaml)"
        )


def prepare(recipe: Recipe) -> Prepared:
    """Validate the recipe against the model's config, the data and the output directory; load no weights."""
    refuse_sharding(recipe)
    args = build_arguments(recipe)
    config = load_config(recipe)
    if recipe.model.get("quantization"):
        require_bitsandbytes()
    rack, skip_modules, plan = rack_from_config(recipe, config)
    max_seq_length = recipe.data.get("max_seq_length", 512)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_seq_length > positions:
        raise RecipeError(f"data.max_seq_length: {max_seq_length} exceeds the model's {positions} positions")
    tokenizer = AutoTokenizer.from_pretrained(recipe.model["name_or_path"], **_model_kwargs(recipe, TOKENIZER_KEYS))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset, eval_dataset = build_datasets(recipe.data, tokenizer, max_seq_length, args.seed)
    num_examples = len(train_dataset) if hasattr(train_dataset, "__len__") else None
    total_steps = planned_total_steps(args, num_examples)
    recipe.schedule.resolve(total_steps)  # every phase gets at least one step
    defaults = {"learning_rate": args.learning_rate, "weight_decay": args.weight_decay}
    if recipe.model.get("quantization"):
        defaults["quantization"] = quantization_identity(settings=recipe.model["quantization"])
    total = args.max_steps if args.max_steps > 0 else None
    identity = run_identity(recipe.schedule.to_list(), rack, total, defaults, plan)
    resume = resolve_resume(args.output_dir, recipe.resume_from_checkpoint)
    if resume is not None:
        check_resumable(resume, identity)
    else:
        check_output_dir(args.output_dir, identity, resuming=False, overwrite=args.overwrite_output_dir)
    return Prepared(
        recipe, args, config, tokenizer, train_dataset, eval_dataset, rack, skip_modules, total_steps, resume
    )


def load_model(prepared: Prepared):
    recipe = prepared.recipe
    dtype = recipe.model.get("dtype", "auto")
    kwargs = _model_kwargs(recipe, FROM_PRETRAINED_KEYS)
    quantization = recipe.model.get("quantization")
    if quantization:
        kwargs["quantization_config"] = bnb_config(quantization, prepared.skip_modules)
    model = AutoModelForCausalLM.from_pretrained(recipe.model["name_or_path"], dtype=dtype, **kwargs)
    disable_cpu_repack(model)
    return model


def build_trainer(prepared: Prepared, model=None) -> StackwiseTrainer:
    return StackwiseTrainer(
        model=model if model is not None else load_model(prepared),
        args=prepared.args,
        train_dataset=prepared.train_dataset,
        eval_dataset=prepared.eval_dataset,
        processing_class=prepared.tokenizer,
        data_collator=default_data_collator,
    )


class KeepRecipe(TrainerCallback):
    """Write the recipe (overrides applied) into the run folder once the trainer has claimed it; the model card of
    an export quotes it."""

    def __init__(self, recipe: Recipe):
        self.text = f"# {recipe.path or 'recipe'}, as run (command-line overrides applied)\n" + yaml.safe_dump(
            recipe.raw, sort_keys=False
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, RECIPE_NAME), "w") as f:
                f.write(self.text)


def train(recipe: Recipe) -> dict:
    """Run a recipe end to end; returns a summary (eval losses, output folder). With ``training.push_to_hub``, the
    final save uploads the run's export (see :mod:`hf_stackwise.hub`)."""
    prepared = prepare(recipe)
    trainer = build_trainer(prepared)
    trainer.add_callback(KeepRecipe(recipe))
    trainer.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    last = trainer.state.log_history[-1] if trainer.state.log_history else {}
    if prepared.eval_dataset is not None and not (evals and "eval_loss" in last):
        evals.append(trainer.evaluate()["eval_loss"])
    trainer.save_model(prepared.args.output_dir)  # with `push_to_hub`, this pushes the run's export
    trainer.save_state()  # trainer_state.json (the log history) at the run's root, for `hf-stackwise plot`
    return {
        "output_dir": prepared.args.output_dir,
        "hub_model_id": trainer.hub_model_id,
        "global_step": trainer.state.global_step,
        "eval_loss_first": evals[0] if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "trace": trainer.resolved.trace(trainer.num_stacks),
    }
