"""When the frozen-prefix activation cache runs, where it cuts, and what it is expected to save.

A phase's *frozen prefix* is the embeddings plus the leading stacks of the phase's arranged order that are
frozen and carry no adapter. With the cache on, the hidden state at the cut (the output of the last prefix block)
is stored per training row the first time the row is seen and replayed on every later visit; the blocks above
the cut run as usual. The cache is *exact* (bit-identical training) when:

- nothing below the cut changes while the store lives: the embeddings do not train (nor a head tied to them),
  no prefix stack trains or carries a LoRA adapter;
- the prefix is deterministic and unhooked: nothing below the cut is random in training mode (dropout, layer drop,
  router jitter, NEFTune noise) or carries a forward hook, and no output reads every layer (see ``hazards``);
- a row's inputs repeat: masked tasks (``mlm``, ``diffusion``) draw a new mask every step, so they never hit.

``auto`` turns the cache on where it is exact and the expected hit rate is at least 50% (each row expected twice
within the phase, its inputs repeating between visits: a padding collator may change them); rows of unknown count
or length leave it off (reason ``unknown``). ``true`` turns it on wherever the phase has a frozen prefix and refuses
(naming ``schedule[i]`` and the reason) where the prefix exists but cannot be exact; ``false`` never. Everything
here is plain arithmetic on the schedule, the layout and a few model facts (the trainer adds a scan of the modules
below each cut, ``prefix_check``), so ``plan`` and the trainer share it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..schedule.phases import EMBEDDINGS, HEAD, TRUNK_ADAPTER, lora_unit, stack_unit, trunk_unit
from .hazards import config_hazard, settings_hazard

CACHE_KEYS = ("activations", "max_memory", "dir")
ACTIVATIONS = ("auto", True, False)
DEFAULT_MAX_MEMORY = 8 * 2**30
MASKED_TASKS = ("mlm", "diffusion")
FINGERPRINT_BYTES = 16  # per stored row: a BLAKE2b digest of the inputs the prefix reads
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(value, path: str = "cache.max_memory") -> int:
    """``"8GiB"`` / ``"512MB"`` / ``1000000`` → bytes; a RecipeError naming ``path`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value)) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in UNITS:
        raise RecipeError(
            f"{path}: {value!r} is not a size; write a number of bytes or a number with a unit, e.g. 8GiB or 512MB"
        )
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class CacheSettings:
    """The recipe's ``cache:`` section, parsed."""

    activations: str | bool = "auto"
    max_memory: int = DEFAULT_MAX_MEMORY
    dir: str | None = None  # None: <output_dir>/activation-cache

    @classmethod
    def from_dict(cls, raw: dict | None) -> CacheSettings:
        raw = raw or {}
        if not isinstance(raw, dict):
            raise RecipeError("cache: expected a mapping with keys among " + ", ".join(CACHE_KEYS))
        known = ", ".join(CACHE_KEYS)
        problems = [f"cache.{k}: unknown key; known keys are {known}" for k in raw if k not in CACHE_KEYS]
        activations = raw.get("activations", "auto")
        if activations not in ACTIVATIONS or activations in (0, 1) and not isinstance(activations, bool):
            problems.append(f"cache.activations: {activations!r} is not auto, true or false")
        max_memory = DEFAULT_MAX_MEMORY
        try:
            max_memory = parse_bytes(raw.get("max_memory", DEFAULT_MAX_MEMORY))
        except RecipeError as err:
            problems.extend(err.problems)
        folder = raw.get("dir")
        if folder is not None and (not isinstance(folder, str) or not folder.strip()):
            problems.append(f"cache.dir: {folder!r} is not a folder path")
        if problems:
            raise RecipeError(problems)
        return cls(activations, max_memory, folder)

    def folder(self, output_dir: str) -> str:
        return self.dir if self.dir is not None else os.path.join(output_dir, "activation-cache")

    def to_dict(self) -> dict:
        """Plain values :meth:`from_dict` reads back (they travel in ``TrainingArguments.activation_cache``)."""
        return {"activations": self.activations, "max_memory": self.max_memory, "dir": self.dir}


@dataclass(frozen=True)
class CacheModel:
    """What the decision needs from the model: costs in parameters (FLOPs per token are ≈ 2 × parameters)."""

    block_params: tuple[int, ...]  # per physical block of the layout (grown blocks included)
    head_params: int  # the output layer's matmul (vocab × hidden for an LM head, even when tied)
    hidden: int
    dtype_bytes: int
    tied: bool = False
    hazard: str | None = None  # why the prefix's output differs between visits (config, settings), if it does
    sharded: bool = False  # FSDP2: every block's forward gathers its shards with every rank

    @classmethod
    def from_config(
        cls,
        config,
        block_params: tuple[int, ...],
        head_params: int,
        dtype_bytes: int,
        sharded: bool = False,
        neftune_noise_alpha: float | None = None,
        lm_head: bool = True,
    ) -> CacheModel:
        """``lm_head``: the output layer is a language-model head (only one can be tied to the input embeddings;
        a classifier is not, whatever ``tie_word_embeddings`` says)."""
        text = getattr(config, "get_text_config", lambda: config)()
        return cls(
            block_params=tuple(block_params),
            head_params=head_params,
            hidden=getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0),
            dtype_bytes=dtype_bytes,
            tied=lm_head and bool(getattr(text, "tie_word_embeddings", False)),
            hazard=settings_hazard(neftune_noise_alpha) or config_hazard(config),
            sharded=sharded,
        )


@dataclass(frozen=True)
class CacheData:
    """What the decision needs from the data: rows, rows per optimizer step, row lengths per phase."""

    rows: int | None  # stored rows (a mixture: the sum over its sources; dpo: 2 per pair); None = unknown
    global_batch: int  # stored rows per optimizer step over every process
    seq_lengths: tuple[int, ...]  # per phase: tokens per row it trains on
    chunk_length: int  # tokens per stored row (a shorter phase splits a row into chunk // seq pieces)
    tasks: tuple[str, ...]  # per phase: clm | mlm | diffusion | classification | sft | dpo
    repeat: float = 1.0  # chance that a row's inputs at one visit equal those at its previous visit (padding)
    repeat_note: str = ""  # why ``repeat`` < 1


@dataclass(frozen=True)
class PhaseCache:
    """The cache decision for one phase."""

    index: int
    on: bool
    cut: int = 0  # blocks below the cut: the position of the cut in the phase's arranged block order
    cut_stacks: int = 0
    prefix: tuple[int, ...] = ()  # physical blocks below the cut, bottom → top
    reason: str = ""  # why the cache is off (empty when on)
    visits: float = 0.0  # expected visits per stored row within the phase
    hit_rate: float = 0.0  # expected share of rows served from the store
    bytes: int = 0  # storage of the phase's store
    ratio: float = 1.0  # predicted step-cost ratio uncached / cached (all hits)
    seq_length: int = 0
    slots: int = 0
    fills: tuple[tuple[int, ...], ...] = field(default=())  # shallower prefixes of later phases filled alongside

    def key(self) -> tuple:
        return (self.prefix, self.seq_length)


def frozen_prefix(units: frozenset[str], order: tuple[int, ...], layout, adapters: dict) -> tuple[int, str]:
    """(stacks below the cut, why the prefix stops there) for one phase. ``adapters``: the run's adapter plan (name →
    settings with ``blocks`` and ``dropout``); an adapter that does not train in the phase is frozen like its block,
    unless its dropout makes the block's output differ between visits."""
    trunk = adapters.get(TRUNK_ADAPTER, {})
    for position, stack in enumerate(order):
        if stack_unit(stack) in units:
            return position, f"stack {position} trains"
        if trunk_unit(stack) in units:
            return position, f"stack {position} carries trunk LoRA, so the prefix is not frozen"
        if lora_unit(stack) in units:
            return position, f"stack {position} trains a LoRA adapter, so the prefix is not frozen"
        blocks = set(layout.stack_blocks(stack))
        for name, settings in adapters.items():
            covered = blocks & set(settings.get("blocks", ())) if name in (TRUNK_ADAPTER, f"stack_{stack}") else ()
            if covered and settings.get("dropout", 0.0):
                what = "trunk LoRA" if settings is trunk else "a LoRA adapter"
                return position, (
                    f"stack {position} carries {what} with dropout {settings['dropout']}, so its output differs "
                    "between visits"
                )
    return len(order), "every stack is frozen"


def blocker(phase_task: str, units: frozenset[str], model: CacheModel) -> str | None:
    """Why a phase's frozen prefix cannot be replayed exactly, or None."""
    if phase_task in MASKED_TASKS:
        return f"data.task {phase_task} draws a new mask every step, so no row's inputs repeat and nothing would hit"
    if phase_task == "sft":
        return "data.task sft: TRL builds the batches, which carry no row ids for the cache"
    if phase_task == "kto":
        return (
            "data.task kto: a step runs the policy on two batches (the mismatched KL completions, then the labelled "
            "ones) and the cache keys one batch of rows per step, so the second forward would be matched against "
            "the first's inputs"
        )
    if EMBEDDINGS in units:
        return "the embeddings train, so the prefix is not frozen"
    if model.tied and HEAD in units:
        return "the head trains and is tied to the input embeddings, so the prefix is not frozen"
    if model.sharded:
        return (
            "training.fsdp: under FSDP2 each block's forward gathers its shards with every rank, so one rank "
            "skipping the prefix on a hit would stall the ranks that miss (a model that fits one device can run "
            "cached under DDP, where the ranks of a node share one store)"
        )
    return model.hazard


def decide(
    schedule,
    bounds: tuple[tuple[int, int], ...],
    layout,
    base,
    settings: CacheSettings,
    model: CacheModel,
    data: CacheData,
    adapters: dict | None = None,
    prefix_check=None,
) -> list[PhaseCache]:
    """One decision per phase; ``activations: true`` raises a RecipeError for every phase it cannot serve exactly.
    ``adapters``: the run's LoRA adapter plan (:func:`hf_stackwise.rack.adapters.plan_adapters`), if any;
    ``prefix_check``: physical prefix blocks → why the modules below that cut are not replayable, or None."""
    units_per_phase = schedule.phase_units(base)
    problems: dict[str, list[int]] = {}  # reason → the phases it refuses (a model-wide reason is said once)
    decisions: list[PhaseCache] = []
    for i, phase in enumerate(schedule.phases):
        units, order = units_per_phase[i], layout.orders[i]
        cut_stacks, stop = frozen_prefix(units, order, layout, adapters or {})
        blocked = blocker(data.tasks[i], units, model) if cut_stacks or "LoRA" in stop else None
        if not blocked and cut_stacks and prefix_check is not None and settings.activations is not False:
            blocked = prefix_check(tuple(layout.blocks(order[:cut_stacks])))
        if settings.activations is False:
            decisions.append(PhaseCache(i, False, reason="cache.activations: false"))
            continue
        if blocked or "LoRA" in stop and not cut_stacks:
            reason = blocked or stop
            if settings.activations is True:
                problems.setdefault(reason, []).append(i)
            decisions.append(PhaseCache(i, False, reason=reason))
            continue
        if not cut_stacks:
            decisions.append(PhaseCache(i, False, reason=f"no frozen prefix: {stop}"))
            continue
        decisions.append(_sized(i, phase, units, order, cut_stacks, layout, bounds, model, data))
    if problems:
        raise RecipeError(
            [
                f"{', '.join(f'schedule[{i}]' for i in phases)}: {reason}; set `cache.activations: auto` or false"
                for reason, phases in problems.items()
            ]
        )
    return _carry_and_fill(decisions, settings, data)


def _sized(i, phase, units, order, cut_stacks, layout, bounds, model, data) -> PhaseCache:
    prefix = tuple(layout.blocks(order[:cut_stacks]))
    seq = data.seq_lengths[i]
    pieces = max(1, data.chunk_length // seq) if seq > 0 else 1
    slots = (data.rows or 0) * pieces if seq > 0 else 0  # no slots: unknown rows or lengths turn the phase off
    start, end = bounds[i]
    visits = (end - start) * data.global_batch * pieces / slots if slots else 0.0
    return PhaseCache(
        index=i,
        on=True,
        cut=len(prefix),
        cut_stacks=cut_stacks,
        prefix=prefix,
        visits=visits,
        bytes=slots * (seq * model.hidden * model.dtype_bytes + FINGERPRINT_BYTES),
        ratio=step_cost_ratio(order, cut_stacks, units, layout, model),
        seq_length=seq,
        slots=slots,
    )


def step_cost_ratio(order, cut_stacks, units, layout, model: CacheModel) -> float:
    """Uncached / cached step cost with every row a hit, in parameter units (FLOPs ∝ parameters per token).

    The prefix costs one forward; above the cut a training block costs forward + input gradient + weight gradient
    (3), a frozen one forward + input gradient (2); the head likewise. With K equal stacks, only the top one and the
    head (H stack-units) training: ``(K + 2 + 3H) / (3 + 3H)``."""
    if not model.block_params:
        return 1.0
    blocks = [sum(model.block_params[b] for b in layout.stack_blocks(s)) for s in order]
    prefix = sum(blocks[:cut_stacks])
    above = sum(
        cost * (3 if stack_unit(order[p]) in units or lora_unit(order[p]) in units else 2)
        for p, cost in enumerate(blocks)
        if p >= cut_stacks
    )
    head = model.head_params * (3 if HEAD in units else 2)
    cached = above + head
    return (prefix + cached) / cached if cached else 1.0


def _carry_and_fill(decisions: list[PhaseCache], settings: CacheSettings, data: CacheData) -> list[PhaseCache]:
    """Phase by phase: a phase's expected hit rate counts the rows that the phases just before it, running cached,
    stored under its key (its own store, or one they filled alongside theirs); then ``auto`` keeps it on or not. A
    phase that runs cached also fills the shallower prefixes of the later phases that run cached (one forward
    computes them)."""
    out = list(decisions)
    for i, d in enumerate(out):
        if not d.cut:
            continue
        seen = 0.0  # visits per row a store of this key already had in the cached phases just before
        for prev in reversed(out[:i]):
            if prev.on and prev.cut and (prev.key() == d.key() or _fills(prev, d)):
                seen += prev.visits
            else:
                break
        first = 1.0 - min(1.0, seen)  # a row's first visit in the phase misses unless an earlier phase stored it
        misses = first + max(0.0, d.visits - first) * (1.0 - data.repeat)  # later visits: inputs may differ
        hit = max(0.0, 1.0 - misses / d.visits) if d.visits else 0.0
        out[i] = _turn_on(_replace(d, hit_rate=hit), settings, data)
    for i, d in enumerate(out):
        if d.on and d.cut:
            shallower = [later.prefix for later in out[i + 1 :] if later.on and _fills(d, later)]
            out[i] = _replace(d, fills=tuple(dict.fromkeys(shallower)))
    return out


def _fills(d: PhaseCache, later: PhaseCache) -> bool:
    """Whether ``d``'s prefix forward also computes ``later``'s (a shallower cut of the same blocks and rows)."""
    return bool(
        later.cut and later.cut < d.cut and later.prefix == d.prefix[: later.cut] and later.seq_length == d.seq_length
    )


def _turn_on(d: PhaseCache, settings: CacheSettings, data: CacheData) -> PhaseCache:
    if not d.cut:
        return d
    if not d.slots:
        return _replace(
            d,
            on=False,
            reason="unknown: the number of training rows or their length is not known (a stream, or a dataset "
            "whose rows are not token lists), so no store can be sized",
        )
    if settings.activations == "auto" and d.hit_rate < 0.5:
        why = f"each row is expected {d.visits:.2f} times in the phase"
        if data.repeat < 1:
            why += f" and {data.repeat_note}"
        return _replace(d, on=False, reason=f"{why}: expected hit rate {d.hit_rate:.0%} (auto needs 50%)")
    return d


def _replace(d: PhaseCache, **changes) -> PhaseCache:
    from dataclasses import replace

    return replace(d, **changes)


def format_cache(decisions: list[PhaseCache] | None, names: list[str]) -> list[str]:
    """The plan's cache table: per phase on/off, the cut, expected hit rate, storage and predicted step ratio."""
    if decisions is None:
        return ["activation cache: off (cache.activations: false)"]
    lines = [
        "activation cache per phase (cut: blocks below it replay from the store; ratio: uncached / cached step, "
        "all hits, from parameter counts)",
        f"{'phase':<14} {'cache':<5} {'cut':<22} {'hit rate':>8} {'storage MiB':>12} {'ratio':>6}  note",
    ]
    for name, d in zip(names, decisions, strict=True):
        cut = f"after block {d.cut - 1} ({d.cut_stacks} stacks)" if d.cut else "-"
        hit = f"{d.hit_rate:.0%}" if d.cut else "-"
        size = f"{d.bytes / 2**20:.1f}" if d.cut else "-"
        ratio = f"{d.ratio:.2f}x" if d.cut else "-"
        lines.append(
            f"{name:<14} {'on' if d.on else 'off':<5} {cut:<22} {hit:>8} {size:>12} {ratio:>6}  {d.reason}".rstrip()
        )
    return lines


def per_rank_hit_rates(
    decisions: list[PhaseCache], world: int, same_global_batch: bool = False, stores: int | None = None
) -> list[float | None]:
    """Expected hit rate per rank of each cached phase under DDP on ``world`` ranks (None where the cache is off).
    ``stores``: how many separate stores the ranks keep (the nodes: the ranks of a node share one, see
    :mod:`~hf_stackwise.cache.node`; default ``world``, one per rank). The sampler deals a row to a rank afresh each
    epoch, so a visit hits only if a rank sharing its store stored the row before. Of a row's ``s`` earlier visits
    (stored by the cached phases just before, as in :func:`_carry_and_fill`) and ``v`` visits in the phase, all
    ranks together, ``M (q^s - q^(s+v))`` are a store's first, with ``M`` stores and ``q = 1 - 1/M``; every other
    visit hits. With the plan's per-device batch, s and v are N times the one-process figures (N times the rows per
    step); with ``same_global_batch`` they are the same (one store: the one-process rate; one per rank: the second
    epoch hits about 1/N of its rows)."""
    stores = world if stores is None else stores
    q = 1.0 - 1.0 / stores
    rates: list[float | None] = []
    for i, d in enumerate(decisions):
        if not (d.on and d.cut):
            rates.append(None)
            continue
        if world == 1 or stores == 1 and same_global_batch:
            rates.append(d.hit_rate)
            continue
        seen = 0.0
        for prev in reversed(decisions[:i]):
            if prev.on and prev.cut and (prev.key() == d.key() or _fills(prev, d)):
                seen += prev.visits
            else:
                break
        scale = 1 if same_global_batch else world
        s, v = seen * scale, d.visits * scale
        firsts = stores * (q**s - q ** (s + v))
        rates.append(max(0.0, 1.0 - firsts / v) if v else 0.0)
    return rates
