"""Input checks the libraries would make only after the weights load (or never): the training arguments'
ranges, evaluation without eval data, optimizers the schedule cannot drive, the output path, the launch, the
model folder's weights and its tokenizer. Each failure names the recipe key and the fix."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import RecipeError

# from_pretrained keyword arguments the tokenizer shares with the model
TOKENIZER_KEYS = ("revision", "subfolder", "trust_remote_code", "gguf_file", "local_files_only", "cache_dir")

logger = logging.getLogger("hf_stackwise")

POSITIVE_INT = "a positive integer"
# TrainingArguments fields it accepts out of range, which the Trainer, torch or numpy then refuse (or misuse)
# mid-run: (test, what a valid value is).
RANGES = {
    "per_device_train_batch_size": (lambda v: v >= 1, POSITIVE_INT),
    "per_device_eval_batch_size": (lambda v: v >= 1, POSITIVE_INT),
    "gradient_accumulation_steps": (lambda v: v >= 1, POSITIVE_INT),
    "eval_accumulation_steps": (lambda v: v >= 1, POSITIVE_INT),
    "save_total_limit": (lambda v: v >= 1, "a positive number of checkpoints to keep"),
    "max_steps": (lambda v: v > 0 or v == -1, "a positive number of optimizer steps, or -1 to count epochs"),
    "learning_rate": (lambda v: v >= 0, "a non-negative number"),
    "weight_decay": (lambda v: v >= 0, "a non-negative number"),
    "adam_epsilon": (lambda v: v >= 0, "a non-negative number"),
    "max_grad_norm": (lambda v: v >= 0, "a non-negative number (0 turns clipping off)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data_seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "dataloader_num_workers": (lambda v: v >= 0, "a non-negative integer"),
    "logging_steps": (lambda v: v > 0, "a positive number of steps (or a fraction of the run)"),
    "eval_steps": (lambda v: v > 0, "a positive number of steps (or a fraction of the run)"),
    "save_steps": (lambda v: v > 0, "a positive number of steps (or a fraction of the run)"),
}
# Optimizers that build their own parameter groups (or take the model): the phases could not set per-unit rates.
OWN_GROUPS = ("galore_", "apollo_", "lomo", "adalomo")


def _name(value) -> str:
    return str(getattr(value, "value", value))


def check_ranges(training: dict, args) -> list[str]:
    problems = []
    for key, (test, what) in RANGES.items():
        value = getattr(args, key, None)
        if value is None or key not in training:
            continue
        if not test(value):
            problems.append(f"training.{key}: {training.get(key, value)!r} is out of range; give {what}")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        problems.append(
            f"training.num_train_epochs: {args.num_train_epochs!r} trains nothing; give a positive number of epochs "
            "or set `training.max_steps`"
        )
    return problems


def check_evaluation(recipe, args) -> list[str]:
    """Evaluation asked for without eval data, and best-model settings without a metric."""
    has_eval = recipe.data.has_eval
    asked = [f"training.eval_strategy: {_name(args.eval_strategy)!r}"] if _name(args.eval_strategy) != "no" else []
    asked += [f"training.{k}: true" for k in ("eval_on_start", "load_best_model_at_end") if getattr(args, k)]
    if asked and not has_eval:
        return [
            f"{asked[0]} evaluates, but the recipe has no eval data; give `data.eval` (load_dataset arguments, like "
            "`data.train`) or `data.eval_fraction`, or set `training.eval_strategy: no` (and drop "
            "`eval_on_start` / `load_best_model_at_end`)"
        ]
    if _name(args.save_strategy) == "best" and args.metric_for_best_model is None:
        return ["training.save_strategy: 'best' needs `training.metric_for_best_model` (e.g. eval_loss)"]
    return []


def check_optimizer(args, schedule=None) -> list[str]:
    """``training.optim`` must be one the schedule can drive (plain parameter groups), be installed, and keep
    per-parameter state if a phase releases it (``optimizer_state: release_idle``)."""
    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    name = _name(args.optim)
    from ..optimizers import mode_switching_problem

    switching = mode_switching_problem(name, "training.optim")  # refused by name: the package may be missing
    if switching:
        return [switching]
    cannot = (
        f"training.optim: {name!r} builds its own parameter groups (or takes the whole model), which a phase "
        "schedule cannot drive; use an AdamW variant (adamw_torch), SGD, Adafactor, RMSprop, Lion or another "
        "standard optimizer"
    )
    if name.startswith(OWN_GROUPS):
        return [cannot]
    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as err:
        detail = " ".join(str(err).split())
        return [
            f"training.optim: {name!r} needs a package that is not installed ({detail}); install it or use adamw_torch"
        ]
    except (ValueError, TypeError, KeyError) as err:
        return [f"training.optim_args: {args.optim_args!r} is not usable with optim {name!r} ({err})"]
    if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        return [cannot]
    if schedule is not None:
        from ..optimizers import check_release_idle

        try:
            check_release_idle(schedule, optimizer_cls, kwargs, f"training.optim: {name!r}")
        except RecipeError as err:
            return err.problems
    return []


def check_reporting(args) -> list[str]:
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    problems = []
    for name in args.report_to or []:
        if not isinstance(name, str) or name not in INTEGRATION_TO_CALLBACK:
            problems.append(
                f"training.report_to: {name!r} is not a reporting integration; use none, all or one of "
                + ", ".join(INTEGRATION_TO_CALLBACK)
            )
        elif name not in get_available_reporting_integrations():
            problems.append(f"training.report_to: {name!r} is not installed; install it or use `report_to: none`")
    return problems


def check_output_path(output_dir: str) -> list[str]:
    """The output directory (or a folder above it) must not be an existing file."""
    path = os.path.abspath(os.path.expanduser(output_dir))
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if os.path.exists(path) and not os.path.isdir(path):
        where = "is" if path == os.path.abspath(os.path.expanduser(output_dir)) else f"is inside {path!r}, which is"
        return [f"training.output_dir: {output_dir!r} {where} a file, not a folder; choose another `output_dir`"]
    return []


def distributed_launch() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 when not launched."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launch_settings(training: dict) -> dict:
    """A multi-process launch on a machine without an accelerator trains with CPU DDP (the Trainer only sets up
    DDP on CPU with ``use_cpu``; without it every process would train alone into the same folder)."""
    if distributed_launch() > 1 and "use_cpu" not in training and not torch.accelerator.is_available():
        logger.info("[hf_stackwise] %d processes and no accelerator: training with CPU DDP", distributed_launch())
        return {**training, "use_cpu": True}
    return training


def check_launch(args) -> list[str]:
    processes = distributed_launch()
    if processes <= 1:
        return []
    from transformers.training_args import ParallelMode

    if args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size != processes:
        return [
            f"training.use_cpu: launched as {processes} processes, but the Trainer would not join them into one "
            "DDP run (each would train alone into the same output_dir); on a machine without an accelerator "
            "run with `--training.use_cpu true`, or launch a single process"
        ]
    return []


def check_arguments(recipe, args) -> None:
    """Every check of the training arguments against the recipe and the launch (no model, data or weights)."""
    problems = check_ranges(recipe.training, args)
    problems += check_evaluation(recipe, args)
    problems += check_optimizer(args, recipe.schedule)
    problems += check_reporting(args)
    problems += check_output_path(args.output_dir)
    if not problems:  # the launch check sets up the process group: only for an otherwise valid recipe
        problems += check_launch(args)
    if problems:
        raise RecipeError(problems)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _cached_hub_files(recipe, repo_id: str, names: tuple[str, ...]) -> list[str] | None:
    """Which of ``names`` the local HF cache holds for a Hub id; None when the Hub may still serve them (online)."""
    import huggingface_hub

    if not (huggingface_hub.is_offline_mode() or recipe.model.get("local_files_only")):
        return None
    subfolder = recipe.model.get("subfolder") or ""
    found = []
    for name in names:
        try:
            hit = huggingface_hub.try_to_load_from_cache(
                repo_id,
                f"{subfolder}/{name}" if subfolder else name,
                cache_dir=recipe.model.get("cache_dir"),
                revision=recipe.model.get("revision"),
            )
        except (ValueError, OSError):  # not a valid repo id: loading the config says so
            return None
        if isinstance(hit, str):
            found.append(name)
    return found


def check_weights(recipe) -> None:
    """The model (not ``from_scratch``) must have weights: a config alone loads random ones or fails. Only
    ``train`` needs them (``plan`` and ``validate`` read the config); it runs this before anything loads. A local
    folder is looked into; a Hub id offline (``HF_HUB_OFFLINE``, ``model.local_files_only``) is looked up in the
    local HF cache; online the Hub is asked when the weights load."""
    path = os.path.expanduser(recipe.model["name_or_path"])
    if recipe.model.from_scratch:
        return
    gguf = recipe.model.get("gguf_file")
    names = (gguf,) if gguf else WEIGHT_FILES
    if os.path.isdir(path):
        folder = os.path.join(path, recipe.model.get("subfolder") or "")
        found = [name for name in names if os.path.isfile(os.path.join(folder, name))]
        where = folder if recipe.model.get("subfolder") else path
    elif not os.path.exists(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1:  # a Hub id
        found = _cached_hub_files(recipe, path, names)
        where = f"{path} (in the local Hugging Face cache, offline)"
        if found is None:
            return
    else:
        return
    if found:
        return
    if gguf:
        raise RecipeError(f"model.gguf_file: {gguf!r} is not a file in {where!r}; give the .gguf file's name")
    key = "model.subfolder" if recipe.model.get("subfolder") else "model.name_or_path"
    raise RecipeError(
        f"{key}: {where!r} has a config but no weights ({' / '.join(WEIGHT_FILES)}); `train` needs them (`plan` and "
        "`validate` do not): point it at a complete model folder, download the weights while online, or set "
        "`model.from_scratch: true` to initialise the architecture"
    )


def load_tokenizer(recipe, config, keys: tuple[str, ...]):
    """The model folder's tokenizer, or a message naming ``model.name_or_path`` when it has none it can use."""
    from transformers import AutoTokenizer

    name = recipe.model.name_or_path
    kwargs = {k: v for k, v in recipe.model.from_pretrained.items() if k in keys}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        detail = " ".join(str(err).split())[:300]
        given = [f"model.{k}" for k in kwargs]
        raise RecipeError(
            f"model.name_or_path: {name!r} has no usable tokenizer ({type(err).__name__}: {detail}); save the "
            "tokenizer into the model folder (tokenizer.save_pretrained)"
            + (f", or check {', '.join(given)}" if given else "")
        ) from None
    vocab, base = getattr(config, "vocab_size", None), getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab, int) and isinstance(base, int) and base > vocab:  # plain text would index past the table
        raise RecipeError(
            f"model.name_or_path: the tokenizer of {name!r} has {base} tokens but the model's vocab_size is "
            f"{vocab}, so some token ids have no embedding; use the model's own tokenizer"
            + (" or raise `model.config.vocab_size`" if recipe.model.from_scratch else "")
        )
    return tokenizer


def library_error_key(err: Exception, training: dict) -> str:
    """The ``training.<key>`` a TrainingArguments / Trainer error is about: a field it names, else the field
    holding the value it quotes; ``training`` when neither is found."""
    text = str(err)
    named = [k for k in training if k in text]
    if named:
        return f"training.{max(named, key=len)}"
    quoted = [k for k, v in training.items() if isinstance(v, (str, int, float)) and str(v) in text.split()]
    return f"training.{quoted[0]}" if len(quoted) == 1 else "training"
