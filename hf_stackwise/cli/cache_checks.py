"""The activation cache seen from a recipe, before any weight loads: the refusals of ``cache.activations: true``,
the storage check, and ``plan``'s per-phase decisions (which count the training rows by tokenizing the data)."""

from __future__ import annotations

from ..cache.activations import check_storage
from ..cache.policy import CacheData, CacheModel, decide
from ..cache.rows import dataset_rows
from ..data.loading import build_datasets
from ..distributed.sharding import requested_engine
from ..rack.adapters import plan_adapters
from .preflight import TOKENIZER_KEYS, load_tokenizer


def lm_head(recipe) -> bool:
    """Whether the run's output layer is a language-model head (a classifier is never tied to the embeddings)."""
    return recipe.data.task != "classification"


def data_of(recipe, args, rows: int | None) -> CacheData:
    """The decision's data view of a recipe (``rows``: training rows, if known)."""
    plane = recipe.data.plane
    phases = recipe.schedule.phases
    per = 2 if plane.task == "dpo" else 1  # a preference pair is two stored rows: chosen and rejected
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size) * per
    seqs = tuple(plane.phase_length(p) for p in phases)
    tasks = tuple(plane.phase_task(p) for p in phases)
    rows = rows * per if rows is not None else None
    return CacheData(rows, batch, seqs, plane.chunk_length(recipe.schedule), tasks)


def check_recipe_cache(recipe, args, config, base: tuple[int, ...]) -> None:
    """``activations: true`` where a phase cannot be exact: one RecipeError naming each ``schedule[i]``, before any
    weight loads."""
    settings = recipe.cache
    if settings.activations is not True:
        return
    layout = recipe.schedule.layout(base)
    bounds = tuple((0, 1) for _ in recipe.schedule.phases)
    neftune = recipe.training.get("neftune_noise_alpha")
    sharded = requested_engine(recipe.training)[0] == "fsdp2"  # the recipe or the accelerate config
    model = CacheModel.from_config(
        config, (), 0, 4, sharded=sharded, neftune_noise_alpha=neftune, lm_head=lm_head(recipe)
    )
    decide(
        recipe.schedule,
        bounds,
        layout,
        base,
        settings,
        model,
        data_of(recipe, args, None),
        adapters_of(recipe, layout),
    )


def adapters_of(recipe, layout) -> dict:
    """The recipe's LoRA adapter plan (empty without LoRA)."""
    return plan_adapters(recipe.schedule, recipe.adapters, layout) if recipe.schedule.uses_lora() else {}


def plan_cache(recipe, args, config, resolved, layout, base, blocks, head_params: int, dtype_bytes: int):
    """Per-phase decisions for ``hf-stackwise plan`` (None with ``cache.activations: false``). The training rows are
    counted by tokenizing the data as ``train`` does (a mixture or a classification set: not counted)."""
    settings = recipe.cache
    if settings.activations is False:
        return None
    block_params = tuple(sum(p.numel() for p in block.parameters()) for block in blocks)
    sharded = requested_engine(recipe.training)[0] == "fsdp2"  # the recipe or the accelerate config
    neftune = recipe.training.get("neftune_noise_alpha")
    model = CacheModel.from_config(config, block_params, head_params, dtype_bytes, sharded, neftune, lm_head(recipe))
    data = data_of(recipe, args, _count_rows(recipe, args, config))
    return decide(recipe.schedule, resolved.bounds, layout, base, settings, model, data, adapters_of(recipe, layout))


def _count_rows(recipe, args, config) -> int | None:
    if recipe.data.mixture or recipe.data.task not in ("clm", "mlm", "diffusion"):
        return None
    tokenizer = load_tokenizer(recipe, config, TOKENIZER_KEYS)
    length = recipe.data.plane.chunk_length(recipe.schedule)
    train, _ = build_datasets(recipe.data, tokenizer, length, args.seed)
    return len(train) if hasattr(train, "__len__") else None


def check_recipe_storage(recipe, args, config, base: tuple[int, ...], train_dataset, resolved) -> None:
    """Before any weight loads: the stores the run will need fit in RAM, or the cache folder takes the rest."""
    settings = recipe.cache
    if settings.activations is False:
        return
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    itemsize = {"bfloat16": 2, "float16": 2}.get(dtype.replace("torch.", ""), 4)
    model = CacheModel.from_config(
        config,
        (),
        0,
        itemsize,
        neftune_noise_alpha=recipe.training.get("neftune_noise_alpha"),
        lm_head=lm_head(recipe),
    )
    layout = recipe.schedule.layout(base)
    data = data_of(recipe, args, dataset_rows(train_dataset))
    decisions = decide(
        recipe.schedule, resolved.bounds, layout, base, settings, model, data, adapters_of(recipe, layout)
    )
    check_storage(decisions, settings, settings.folder(args.output_dir), args.world_size > 1)
