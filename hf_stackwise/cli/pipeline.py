"""From a recipe to a trained model. Every check that needs the model's config or the data runs
before a weight is loaded and before the output directory is touched.
"""

from __future__ import annotations

import copy
import enum
import math
import os
import signal
import types
import typing
from dataclasses import dataclass, fields

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    TrainerCallback,
    default_data_collator,
    set_seed,
)

from ..data import classification
from ..data.loading import build_datasets, build_sources
from ..data.mixture import MixtureDataset
from ..data.preference import build_preference_datasets
from ..data.sft import build_sft_datasets, check_causal, sft_config_fields
from ..distributed.ddp import find_unused_parameters
from ..distributed.sharding import check_sharding, storage_settings
from ..errors import StackwiseError
from ..persist.checkpoint import RECIPE_NAME, check_output_dir, check_resumable, resolve_resume, run_identity
from ..rack.adapters import plan_adapters, resolve_targets
from ..rack.growth import allocate, check_growth
from ..rack.quantization import (
    bnb_config,
    disable_cpu_repack,
    full_precision_modules,
    quantization_identity,
    require_bitsandbytes,
)
from ..rack.rack import find_layers_path, resolve_boundaries
from ..recipe.callbacks import build_callbacks, training_arguments
from ..recipe.sections import Recipe
from ..schedule.layout import stack_sizes
from ..schedule.phases import MASKED_TASKS, RecipeError, ResolvedSchedule
from ..trainer import StackwiseArguments, StackwiseTrainer
from .cache_checks import check_recipe_cache, check_recipe_storage
from .preference import check_reference, dpo_classes, dpo_fields, is_dpo
from .preflight import (
    TOKENIZER_KEYS,
    check_arguments,
    check_weights,
    launch_settings,
    library_error_key,
    load_tokenizer,
)


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
    resolved: ResolvedSchedule | None = None  # the phase boundaries at total_steps


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


def sft_classes():
    """``(StackwiseSFTConfig, StackwiseSFTTrainer)`` from :mod:`~hf_stackwise.integrations.sft_trainer` (trl)."""
    try:
        from ..integrations.sft_trainer import StackwiseSFTConfig, StackwiseSFTTrainer
    except ImportError as err:
        if "trl" not in str(err):
            raise
        raise RecipeError(
            "data.task: `sft` runs through TRL's SFTTrainer, and trl is not installed; pip install 'hf-stackwise[trl]'"
        ) from None
    return StackwiseSFTConfig, StackwiseSFTTrainer


def build_arguments(recipe: Recipe) -> StackwiseArguments:
    """``StackwiseArguments`` from the recipe's ``training`` section plus its schedule and rack."""
    training = launch_settings(recipe.training.arguments)
    training.update(training_arguments(recipe.callbacks, training))
    # dpo / kto: beta, loss_type, reference, ...
    arguments_class = dpo_classes(recipe.data.task)[0] if is_dpo(recipe) else StackwiseArguments
    known = {f.name for f in fields(arguments_class) if f.init}
    unknown = [k for k in training if k not in known]
    if unknown:
        raise RecipeError([f"training.{k}: not a TrainingArguments field; check the spelling" for k in unknown])
    hints = typing.get_type_hints(arguments_class)
    for key, value in training.items():
        # YAML 1.1 reads `save_strategy: no` as false: mean the string where the field takes no boolean
        if value is False and key in hints and not _matches(False, hints[key]) and _matches("no", hints[key]):
            training[key] = "no"
    wrong = [
        f"training.{k}: {v!r} is not of type {_type_name(hints[k])}"
        for k, v in training.items()
        if k in hints and not _matches(v, hints[k]) and not (k == "fsdp" and isinstance(v, bool))
    ]  # transformers annotates `fsdp` as a string but asks for `fsdp: true`
    if wrong:
        raise RecipeError(wrong)
    extra = {}
    if is_dpo(recipe):  # StackwiseArguments combined with trl.DPOConfig (hf_stackwise.integrations.dpo_trainer)
        extra = dpo_fields(recipe, recipe.data.plane.max_seq_length)
    if recipe.data.task == "sft":  # StackwiseArguments combined with trl.SFTConfig (hf_stackwise.data.sft)
        arguments_class = sft_classes()[0]
        extra = sft_config_fields(recipe.data, recipe.data.plane.chunk_length(recipe.schedule))
    boundaries = recipe.rack.boundaries
    try:
        args = arguments_class(
            **training,
            **extra,
            schedule=recipe.schedule,  # parsed; the arguments keep its list as written (generators unexpanded)
            blocks_per_stack=recipe.rack.blocks_per_stack,
            stack_boundaries=list(boundaries) if boundaries is not None else None,
            rack_layers=recipe.rack.layers,
            adapters=recipe.adapters.to_dict() or None,
            data_plane=recipe.data.plane.to_dict(),
            activation_cache=recipe.cache.to_dict(),
        )
    except RecipeError:
        raise
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{library_error_key(err, training)}: {' '.join(str(err).split())}") from None
    check_arguments(recipe, args)
    return args


def load_config(recipe: Recipe):
    path = os.path.expanduser(recipe.model["name_or_path"])
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not os.path.exists(path):
        fix = "give a local model folder or a Hub id like `org/name`"
        if ".cache" in os.path.normpath(path).split(os.sep):
            fix = "run `make assets` (it writes the shipped recipes' models into .cache/), or " + fix
        raise RecipeError(f"model.name_or_path: {path!r} does not exist; {fix}")
    try:
        config = AutoConfig.from_pretrained(path, **recipe.model.from_pretrained)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RecipeError(
            f"model.name_or_path: cannot load the config of {path!r}: {' '.join(str(err).split())}"
        ) from None
    overrides = recipe.model.config or {}
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise RecipeError(
            f"model.config.{unknown[0]}: {type(config).__name__} has no such setting; override only keys its "
            "config.json has (e.g. num_hidden_layers, hidden_size)"
        )
    for key, value in overrides.items():
        sized = key.startswith(("num_", "n_")) or key.endswith(("_size", "_dim", "_layers", "_heads", "_embeddings"))
        if sized and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise RecipeError(f"model.config.{key}: {value!r} is not a positive size; give a positive integer")
        try:
            setattr(config, key, value)
        except (StrictDataclassError, TypeError, ValueError) as err:
            detail = " ".join(str(err).split())
            raise RecipeError(
                f"model.config.{key}: {value!r} is refused by {type(config).__name__} ({detail})"
            ) from None
    return config


def task_key(recipe: Recipe) -> str:
    """The key that makes the run a masked LM: ``data.task`` or the first masked phase's ``task``."""
    if recipe.data.task in MASKED_TASKS:
        return "data.task"
    for index, phase in enumerate(recipe.schedule.phases):
        if phase.task in MASKED_TASKS:
            return f"schedule[{index}].task"
    return "data.task"


def auto_model_class(recipe: Recipe):
    """``AutoModelForMaskedLM`` when any phase trains ``mlm`` / ``diffusion``, ``AutoModelForSequenceClassification``
    for ``classification``, else ``AutoModelForCausalLM``."""
    if classifies(recipe):
        return AutoModelForSequenceClassification
    return AutoModelForMaskedLM if recipe.data.plane.masked(recipe.schedule) else AutoModelForCausalLM


def classifies(recipe: Recipe) -> bool:
    return recipe.data.task == "classification"


def check_lengths(recipe: Recipe, config) -> None:
    """Every phase's row length fits the model's positions."""
    plane = recipe.data.plane
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:
        return
    if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2  # RoBERTa's position ids start after the padding index
    problems = []
    if plane.max_seq_length > positions:
        problems.append(f"data.max_seq_length: {plane.max_seq_length} exceeds the model's {positions} positions")
    for index, phase in enumerate(recipe.schedule.phases):
        if phase.max_seq_length is not None and phase.max_seq_length > positions:
            problems.append(
                f"schedule[{index}].max_seq_length: {phase.max_seq_length} exceeds the model's {positions} positions"
            )
    if problems:
        raise RecipeError(problems)


def build_mixture(
    recipe: Recipe, args: StackwiseArguments, sources: dict, resolved: ResolvedSchedule
) -> MixtureDataset:
    """The stream of ``max_steps × batch × accumulation × processes`` samples over the named sources."""
    plane = recipe.data.plane
    phases = [(end, plane.mixture_weights(p)) for (_, end), p in zip(resolved.bounds, recipe.schedule.phases)]
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    seed = args.data_seed if args.data_seed is not None else args.seed
    return MixtureDataset(sources, phases, per_step, resolved.total_steps, seed)


def meta_model(config, recipe: Recipe | None = None):
    """The model built on the meta device: every module and parameter shape, no memory, no weights (the config
    is copied: growth checks edit the skeleton's)."""
    model_class = auto_model_class(recipe) if recipe is not None else AutoModelForCausalLM
    if recipe is not None and recipe.data.task in ("sft", "dpo", "kto"):
        check_causal(config)
    if model_class is AutoModelForSequenceClassification:
        classification.needs_model_class(config)
    try:
        with torch.device("meta"):
            return model_class.from_config(copy.deepcopy(config))
    except ValueError as err:
        if recipe is not None and recipe.model.config and type(config) in model_class._model_mapping:
            raise config_error(recipe, config, err) from None
        if model_class is AutoModelForMaskedLM:
            raise RecipeError(
                f"{task_key(recipe)}: `mlm` / `diffusion` need a masked-LM architecture (an encoder such as BERT, "
                f"RoBERTa or MiniLM), and {config.model_type!r} has none; use `task: clm` for a decoder"
            ) from None
        raise RecipeError(
            f"data.task: `clm` needs a causal-LM architecture, and {config.model_type!r} has none ({err})"
        ) from None
    except (RuntimeError, TypeError, ZeroDivisionError, AttributeError, IndexError) as err:
        if recipe is None or not recipe.model.config:
            raise
        raise config_error(recipe, config, err) from None


def config_error(recipe: Recipe, config, err: Exception) -> RecipeError:
    """``model.config`` overrides the architecture cannot be built with."""
    detail = " ".join(str(err).split())[:300]
    return RecipeError(
        f"model.config: {type(config).__name__} cannot be built with {dict(recipe.model.config)} "
        f"({type(err).__name__}: {detail}); give settings the architecture takes (positive sizes, heads dividing "
        "hidden_size)"
    )


class Racked(typing.NamedTuple):
    """The rack stage: the recipe with its schedule expanded against the rack, and the rack itself."""

    recipe: Recipe
    topology: dict  # layers, num_blocks, boundaries
    skip_modules: list[str]  # kept out of 4-bit
    adapter_plan: dict  # the LoRA adapters of every phase, checked against the real layers


def rack_from_config(recipe: Recipe, config) -> Racked:
    """Find the block list on a weightless (meta-device) copy of the model and lay out the stacks."""
    skeleton = meta_model(config, recipe)
    layers = find_layers_path(skeleton, recipe.rack.layers)
    blocks = skeleton.get_submodule(layers)
    boundaries = resolve_boundaries(len(blocks), recipe.rack.blocks_per_stack, recipe.rack.boundaries)
    sizes = stack_sizes(boundaries)
    recipe = recipe.for_rack(sizes)  # schedule generators over `all` need the rack's size
    schedule = recipe.schedule
    schedule.validate_rack(sizes)
    layout = schedule.layout(sizes)
    skip = full_precision_modules(skeleton, layers, schedule, boundaries)
    if layout.grows:  # growth is checked, and its blocks allocated, on the weightless skeleton too
        check_growth(skeleton, layers, layout)
        allocate(skeleton, layers, layout)
    plan = plan_adapters(schedule, recipe.adapters, layout) if schedule.uses_lora() else {}
    resolve_targets(plan, blocks)
    topology = {"layers": layers, "num_blocks": boundaries[-1], "boundaries": list(boundaries)}
    return Racked(recipe, topology, skip, plan)


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


class Checked(typing.NamedTuple):
    """What the config-only checks resolve: the arguments, the model's config and the rack."""

    args: StackwiseArguments
    config: object
    rack: dict
    skip_modules: list[str]
    adapter_plan: dict
    recipe: Recipe  # the schedule expanded against the rack
    resolved: ResolvedSchedule | None  # with `training.max_steps`: the boundaries, known before any data loads


def check_recipe(recipe: Recipe) -> Checked:
    """Every check that needs the recipe and the model's config only (no tokenizer, data or weights).

    ``plan``, ``validate`` and ``train`` all start here, so they accept and refuse the same recipes:
    recipe → config → rack → arguments (→ boundaries, when ``max_steps`` gives them) → cache refusals."""
    config = load_config(recipe)
    if recipe.model.quantization:
        require_bitsandbytes()
    recipe, topology, skip_modules, plan = rack_from_config(recipe, config)
    sizes = stack_sizes(topology["boundaries"])
    # FSDP2 / FSDP1 / DeepSpeed (recipe or accelerate config): refused, with the reason, where they would be wrong
    check_sharding(recipe.training, recipe.schedule, sizes, recipe.model.quantization or False)
    find_unused_parameters(recipe.training.get("ddp_find_unused_parameters"), config)  # refuses an unsafe `false`
    args = build_arguments(recipe)
    check_lengths(recipe, config)
    resolved = None
    if args.max_steps and args.max_steps > 0:  # every phase gets a step: known before any data or weight loads
        resolved = recipe.schedule.resolve(args.max_steps)
    check_recipe_cache(recipe, args, config, sizes)
    if is_dpo(recipe):
        check_reference(recipe, config, sizes)
    return Checked(args, config, topology, skip_modules, plan, recipe, resolved)


class Data(typing.NamedTuple):
    """The data stage: the training and eval sets, and the run's optimizer steps with the boundaries they give."""

    train_dataset: object
    eval_dataset: object
    resolved: ResolvedSchedule


def load_data(recipe: Recipe, args: StackwiseArguments, config, tokenizer, known: ResolvedSchedule | None) -> Data:
    """Tokenize the data the way the task needs and resolve the phase boundaries (``known``: already resolved from
    ``max_steps``)."""
    data, plane = recipe.data, recipe.data.plane
    length = plane.chunk_length(recipe.schedule)  # shorter phases split these rows in the training step
    sft = data.task == "sft"

    def resolve(total_steps: int) -> ResolvedSchedule:  # every phase gets at least one step
        return (
            known if known is not None and known.total_steps == total_steps else recipe.schedule.resolve(total_steps)
        )

    if sft:  # conversations, validated here; TRL tokenizes them when the trainer is built
        if data.get("packing") and not (args.max_steps and args.max_steps > 0):
            raise RecipeError(
                "training.max_steps: packed rows are only counted once TRL has tokenized them, so epochs give no "
                "step count for the phase boundaries; set `training.max_steps`"
            )
        sft_train, sft_eval = build_sft_datasets(data, tokenizer, recipe.model.name_or_path, length, args.seed)
    if is_dpo(recipe):  # preference pairs, validated here; TRL tokenizes them (below: the same path as sft rows)
        sft = True
        sft_train, sft_eval = build_preference_datasets(data, tokenizer, recipe.model.name_or_path, args.seed)
    if classifies(recipe):  # labelled rows; the label set goes into the config before any weight loads
        train_dataset, eval_dataset = classification.build_datasets(
            data, tokenizer, plane.max_seq_length, args.seed, config
        )
        return Data(train_dataset, eval_dataset, resolve(planned_total_steps(args, len(train_dataset))))
    if data.mixture:
        if not (args.max_steps and args.max_steps > 0):
            raise RecipeError(
                "training.max_steps: a mixture (`data.datasets`) is a stream of max_steps × batch samples; set "
                "`training.max_steps`"
            )
        if sft:
            sources, eval_dataset = sft_train, sft_eval
        else:
            sources, eval_dataset = build_sources(data, tokenizer, length, args.seed)
        resolved = resolve(args.max_steps)
        return Data(build_mixture(recipe, args, sources, resolved), eval_dataset, resolved)
    if sft:
        train_dataset, eval_dataset = sft_train, sft_eval
    else:
        train_dataset, eval_dataset = build_datasets(data, tokenizer, length, args.seed)
    num_examples = len(train_dataset) if hasattr(train_dataset, "__len__") else None
    return Data(train_dataset, eval_dataset, resolve(planned_total_steps(args, num_examples)))


def prepare(recipe: Recipe) -> Prepared:
    """Validate the recipe against the model's config, the data and the output directory; load no weights.

    The pipeline: recipe → config → rack → arguments → tokenizer → data and boundaries → cache decisions → the
    run's identity against the output directory. Each stage takes the results of the stages before it."""
    args, config, rack, skip_modules, plan, recipe, known = check_recipe(recipe)
    tokenizer = load_tokenizer(recipe, config, TOKENIZER_KEYS)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if recipe.data.plane.masked(recipe.schedule) and tokenizer.mask_token_id is None:
        raise RecipeError(
            f"{task_key(recipe)}: `mlm` / `diffusion` replace tokens by the mask token, and the tokenizer of "
            f"{recipe.model.name_or_path!r} has none; use a tokenizer with a mask token (BERT's [MASK])"
        )
    train_dataset, eval_dataset, resolved = load_data(recipe, args, config, tokenizer, known)
    check_recipe_storage(recipe, args, config, stack_sizes(rack["boundaries"]), train_dataset, resolved)
    defaults = {"learning_rate": args.learning_rate, "weight_decay": args.weight_decay, "data": args.data_plane}
    if recipe.model.quantization:
        defaults["quantization"] = quantization_identity(settings=recipe.model.quantization)
    total = args.max_steps if args.max_steps > 0 else None
    identity = run_identity(recipe.schedule.to_list(), rack, total, defaults, plan)
    resume = resolve_resume(args.output_dir, recipe.resume_from_checkpoint)
    if resume is not None:
        check_resumable(resume, identity)
    else:
        check_output_dir(args.output_dir, identity, resuming=False, overwrite=args.overwrite_output_dir)
    return Prepared(
        recipe,
        args,
        config,
        tokenizer,
        train_dataset,
        eval_dataset,
        rack,
        skip_modules,
        resolved.total_steps,
        resume,
        resolved,
    )


def load_model(prepared: Prepared):
    recipe = prepared.recipe
    dtype = recipe.model.dtype
    kwargs = dict(recipe.model.from_pretrained)
    quantization = recipe.model.quantization
    if quantization:
        storage = storage_settings(recipe.training)  # FSDP2 packs 4-bit weights in the dtype it gathers in
        kwargs["quantization_config"] = bnb_config(quantization, prepared.skip_modules, storage)
    model_class = auto_model_class(recipe)
    # Weights the checkpoint lacks (a new classifier head, or the whole model from scratch) are initialised
    # while loading, before the Trainer seeds anything: seed them by training.seed, or two runs differ.
    set_seed(prepared.args.seed)
    if recipe.model.from_scratch:  # the architecture's own initialisation
        return model_class.from_config(prepared.config, **({} if dtype == "auto" else {"dtype": dtype}))
    if recipe.model.config or classifies(recipe):  # overrides, or the label set
        kwargs["config"] = prepared.config
    model = model_class.from_pretrained(recipe.model.name_or_path, dtype=dtype, **kwargs)
    disable_cpu_repack(model)
    return model


def build_trainer(prepared: Prepared, model=None) -> StackwiseTrainer:
    model = model if model is not None else load_model(prepared)
    task = {"data_collator": default_data_collator, "callbacks": build_callbacks(prepared.recipe.callbacks)}
    trainer_class = StackwiseTrainer
    if prepared.recipe.data.task == "sft":  # TRL's SFTTrainer tokenizes, labels, packs and collates
        trainer_class, task["data_collator"] = sft_classes()[1], None
    if is_dpo(prepared.recipe):  # TRL's DPOTrainer tokenizes and collates the pairs; the reference: reference.py
        trainer_class, task["data_collator"] = dpo_classes(prepared.recipe.data.task)[1], None
    if classifies(prepared.recipe):  # padding collator, metrics, the confusion log
        data = prepared.recipe.data
        padding = (data.entries.get("padding") or "longest", data.plane.max_seq_length)
        extra = classification.trainer_kwargs(prepared.config, prepared.tokenizer, *padding)
        task = {**task, **extra, "callbacks": task["callbacks"] + extra["callbacks"]}
    try:
        return trainer_class(
            model=model,
            args=prepared.args,
            train_dataset=prepared.train_dataset,
            eval_dataset=prepared.eval_dataset,
            processing_class=prepared.tokenizer,
            **task,
        )
    except StackwiseError:
        raise
    except ValueError as err:  # the Trainer refusing a training setting: name it (anything else stays a bug)
        key = library_error_key(err, prepared.recipe.training)
        if key == "training":
            raise
        raise RecipeError(f"{key}: {' '.join(str(err).split())}") from err


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


def final_eval(state, args) -> dict | None:
    """The eval the loop already logged of the weights the run ends with, if any: the one at the last step, or
    at the best step when the best checkpoint was loaded back (the last log entry is always the train summary)."""
    step = state.global_step
    if args.load_best_model_at_end and state.best_model_checkpoint and state.best_global_step:
        step = state.best_global_step
    return next((h for h in reversed(state.log_history) if "eval_loss" in h and h.get("step") == step), None)


def train(recipe: Recipe) -> dict:
    """Run a recipe end to end; returns a summary (eval losses, output folder). With ``training.push_to_hub``, the
    final save uploads the run's export (see :mod:`hf_stackwise.export.hub`). Stopped by SIGTERM, it returns
    ``preempted_at`` (the step its last checkpoint holds) instead."""
    check_weights(recipe)  # only `train` needs weights: refused here, before the data or any weight loads
    prepared = prepare(recipe)
    trainer = build_trainer(prepared)
    trainer.add_callback(KeepRecipe(recipe))
    trainer.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    if trainer.preemption.stopped_at is not None:  # SIGTERM: the checkpoint is the result; no eval, no final save
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a launcher relaying SIGTERM again must not cut the exit short
        return {"output_dir": prepared.args.output_dir, "preempted_at": trainer.preemption.stopped_at}
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    done = final_eval(trainer.state, trainer.args)
    if done is not None:  # evaluate once: the loop evaluated the final weights already
        evals.append(done["eval_loss"])
    elif prepared.eval_dataset is not None:
        final = trainer.evaluate()  # no eval_loss when every eval batch was dropped (dataloader_drop_last)
        evals += [final["eval_loss"]] if "eval_loss" in final else []
    output_dir = prepared.args.output_dir
    trainer.save_model(output_dir)  # with `push_to_hub`, this pushes the run's export
    trainer.save_state()  # trainer_state.json (the log history) at the run's root, for `hf-stackwise plot`
    model_dir = output_dir  # a full-weight run's output_dir is its plain model
    if trainer.adapter_plan:
        model_dir = output_dir if prepared.args.save_merged else None
        if model_dir is not None and trainer.args.should_save:
            from ..export.folder import merge_into

            merge_into(output_dir)
    return {
        "output_dir": output_dir,
        "model_dir": model_dir,
        "model_class": auto_model_class(prepared.recipe).__name__,
        "hub_model_id": trainer.hub_model_id,
        "global_step": trainer.state.global_step,
        "total_steps": trainer.resolved.total_steps,  # more than global_step when a callback stopped the run
        "eval_loss_first": evals[0] if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "trace": trainer.resolved.trace(trainer.base_sizes),
    }
