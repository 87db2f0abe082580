"""The frozen-prefix activation cache: stores of hidden states at a cut, the replay modules, the trainer hooks.

**Store.** One per (prefix blocks, row length): ``slots`` rows of ``[row length, hidden]`` in the dtype the hidden
state has at the cut, pre-allocated in RAM while the stores fit in ``cache.max_memory``, else memory-mapped files
under ``cache.dir`` (see :mod:`~hf_stackwise.cache.store`: fingerprints, signature and run identity, locks, checks
on reload). At each phase start a signature mismatch (growth at or below the cut, a prefix that trained) empties a
store, and the modules below the cut are scanned again (:mod:`~hf_stackwise.cache.hazards`): a hook registered
since the decision turns the phase off (``auto``) or stops the run (``true``) before its first step.

**Replay.** Inside the arrangement the trainer runs, the prefix positions hold :class:`PrefixPosition` modules
wrapping the real blocks, so the model-level forward (causal mask, rotary embeddings, per-layer attention types,
``layer_idx``) runs unchanged. At position 0 the batch is looked up: if every row is stored, the positions below
the cut pass the hidden state through and the last returns the stored hidden state; otherwise every prefix block
runs for real under ``no_grad`` (nothing below the cut needs a gradient) and the rows are stored at the cut and at
the shallower cuts later phases use. Rows are identified by a row-id column the trainer adds to the training data
(:data:`ROW_KEY`, removed before the model sees the batch); a row a shorter phase splits into pieces has one slot
per piece.

**DDP.** The ranks of a node share one store per cut (:mod:`~hf_stackwise.cache.node`): each writes its own
segment files under ``cache.dir`` and reads the others', a slot of another rank only from the step after it was
written. Every row seen by any rank of the node serves them all, as in one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..errors import RecipeError
from ..persist.checksum import tensor_checksums
from ..schedule.phases import EMBEDDINGS, HEAD
from .hazards import module_hazard, prefix_modules
from .node import open_node_store
from .policy import CacheData, CacheModel, CacheSettings, PhaseCache, decide
from .rows import dataset_rows, longest_row, padding_repeat
from .store import ActivationStore, fingerprints, identity_key, run_identity

logger = logging.get_logger(__name__)

ROW_KEY = "stackwise_row"  # the row-id column; popped from the batch before the model sees it


class Replay:
    """Per phase: the cut, the stores it reads and fills, and the current micro-batch's slots and fingerprints."""

    def __init__(
        self,
        decision: PhaseCache,
        blocks: nn.ModuleList,
        stores: dict[int, ActivationStore],
        counts: list,
        exposed: tuple[int, ...] = (),
    ):
        self.cut = decision.cut
        self.counts = counts  # [rows served from the store, rows looked up], shared with the trainer
        self.main = stores[self.cut]
        self.record = stores  # blocks below a cut -> its store
        # shallower cuts whose hidden state a reader takes from the position below them (the DPO `shared` reference):
        # on a hit that position returns its store's state, so every one must match too
        self.exposed = {c: stores[c] for c in exposed if 0 < c < self.cut}
        self.modules = {p: PrefixPosition(blocks[b], p, self) for p, b in enumerate(decision.prefix)}
        self.slots: np.ndarray | None = None
        self.fps: np.ndarray | None = None
        self.hit = False
        self.cached: torch.Tensor | None = None  # the stored rows of a hit, copied at lookup
        self.exposed_cached: dict[int, torch.Tensor] = {}  # the exposed cuts' stored rows of a hit
        self.tuple_output = False

    def set_batch(self, rows: torch.Tensor, inputs: dict, step: int = 0) -> None:
        """The micro-batch's rows; ``step``: the optimizer step it belongs to (a node store's visibility rule)."""
        for store in self.record.values():
            store.now = step
        ids = inputs["input_ids"]
        count = rows.numel()
        pieces = ids.shape[0] // count
        rows = rows.detach().cpu().numpy().astype(np.int64)
        slots = (rows[:, None] * pieces + np.arange(pieces)[None, :]).reshape(-1)
        if pieces * count != ids.shape[0] or slots.max(initial=0) >= self.main.slots:
            self.slots = None  # rows the stores have no slot for: run the prefix, store nothing
            return
        self.slots, self.fps = slots, fingerprints(inputs)

    def begin(self, length: int, device) -> None:
        """Look the micro-batch up; on a hit, copy its stored rows now (a node store checks them as it copies)."""
        self.hit, self.cached = False, None
        if self.slots is None:
            return
        matched = self.main.match(self.slots, self.fps)
        for store in self.exposed.values():
            matched &= store.match(self.slots, self.fps)
        if matched.all():
            self.cached = self.main.read(self.slots, length, device)
            self.exposed_cached = {c: store.read(self.slots, length, device) for c, store in self.exposed.items()}
            if self.cached is None or any(v is None for v in self.exposed_cached.values()):
                self.cached = None  # another rank rewrote a row while it was copied: run the prefix
                matched[:] = False
        self.counts[0] += int(matched.sum())
        self.counts[1] += len(self.slots)
        self.hit = self.cached is not None

    def run(self, position: int, block: nn.Module, hidden: torch.Tensor, args, kwargs):
        if position == 0:
            self.begin(hidden.shape[1], hidden.device)
        if self.hit:
            store = self.main if position == self.cut - 1 else self.exposed.get(position + 1)
            if store is None:
                return (hidden,) if self.tuple_output else hidden
            if store is self.main:
                cached, self.cached = self.cached, None
            else:
                cached = self.exposed_cached.pop(position + 1)
            return (cached,) if self.tuple_output else cached
        with torch.no_grad():
            out = block(hidden, *args, **kwargs)
        self.tuple_output = isinstance(out, tuple)
        store = self.record.get(position + 1)
        if store is not None and self.slots is not None:
            state = out[0] if self.tuple_output else out
            new = ~store.match(self.slots, self.fps)
            if new.any():
                store.write(self.slots[new], self.fps[new], state[torch.from_numpy(new).to(state.device)])
        return out


class PrefixPosition(nn.Module):
    """Stands at one prefix position of the arranged block list; attribute reads fall through to the real block."""

    def __init__(self, block: nn.Module, position: int, replay: Replay):
        super().__init__()
        self.block = block
        self.position = position
        self.__dict__["replay"] = replay

    def forward(self, hidden_states, *args, **kwargs):
        return self.replay.run(self.position, self.block, hidden_states, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def with_row_ids(dataset):
    """The training rows with their index in :data:`ROW_KEY` (a mixture: the source offset plus the source row)."""
    import datasets

    from ..data.mixture import MixtureDataset

    if isinstance(dataset, datasets.Dataset):
        return dataset.add_column(ROW_KEY, list(range(len(dataset))))
    if isinstance(dataset, MixtureDataset):
        out = MixtureWithRows.__new__(MixtureWithRows)
        out.__dict__.update(dataset.__dict__)
        return out
    return RowsDataset(dataset)


def _mixture_rows():
    from ..data.mixture import MixtureDataset

    class MixtureWithRows(MixtureDataset):
        def __getitem__(self, i: int) -> dict:
            if not 0 <= i < len(self):
                raise IndexError(i)
            name = self.source_of(i)
            row = self.row_of(name, i)
            offset = sum(len(self.sources[n]) for n in self.names[: self.names.index(name)])
            return {**self.sources[name][row], ROW_KEY: offset + row}

    return MixtureWithRows


MixtureWithRows = _mixture_rows()


class PairRows:
    """Wraps TRL's preference collator, which puts a micro-batch's chosen sequences first and its rejected ones after
    them and drops unknown keys: pair ``i`` (its :data:`ROW_KEY`) becomes row keys ``2i`` (chosen) and ``2i + 1``
    (rejected), in the batch's order, so each sequence has its own slot."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        if not examples or ROW_KEY not in examples[0]:
            return self.collator(examples)
        pairs = torch.tensor([int(e[ROW_KEY]) for e in examples], dtype=torch.long)
        batch = self.collator([{k: v for k, v in e.items() if k != ROW_KEY} for e in examples])
        return {**batch, ROW_KEY: torch.cat([2 * pairs, 2 * pairs + 1])}


class RowsDataset(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], ROW_KEY: i}


def check_storage(decisions: list[PhaseCache], settings: CacheSettings, folder: str, shared: bool = False) -> None:
    """Stores beyond the RAM budget go to disk (``shared``, DDP's node stores: every store): the folder must be
    writable and the disk large enough."""
    sizes: dict[tuple, int] = {}
    for d in decisions:
        if d.on:
            sizes[d.key()] = d.bytes
            for prefix in d.fills:
                sizes[(prefix, d.seq_length)] = d.bytes
    spill = sum(sizes.values()) if shared else max(0, sum(sizes.values()) - settings.max_memory)
    if not spill:
        return
    existing = os.path.abspath(folder)  # nothing is created here: the nearest existing folder must be writable
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not os.path.isdir(existing) else "is not writable"
        raise RecipeError(
            f"cache.dir: {folder!r} cannot be written ({existing} {what}); the cache needs {spill / 2**30:.2f} GiB "
            "on disk beyond cache.max_memory; give a writable folder or raise max_memory"
        )
    free = shutil.disk_usage(existing).free
    if free < spill:
        raise RecipeError(
            f"cache.dir: {folder!r} has {free / 2**30:.2f} GiB free but the cache needs {spill / 2**30:.2f} GiB on "
            "disk beyond cache.max_memory; free space, point cache.dir elsewhere, raise max_memory or set "
            "cache.activations: false"
        )


class ActivationCacheMixin:
    """Trainer hooks (see :class:`~hf_stackwise.trainer.StackwiseTrainer`): decisions, stores, replay, logs."""

    def _init_activation_cache(self) -> None:
        self.cache_settings = CacheSettings.from_dict(self.args.activation_cache)
        self.cache_decisions: list[PhaseCache] | None = None
        self._stores: dict[tuple, ActivationStore] = {}
        self._ram_bytes = 0
        self._replay: Replay | None = None
        self._cache_counts = [0, 0]  # rows served from a store, rows looked up (this process, since the start)
        self._cache_log = [0, 0]  # the counts at the last log
        self._cache_reload = False  # a resumed run may reload memory-mapped stores; a fresh one never does

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if ROW_KEY not in self._signature_columns:
            self._signature_columns.append(ROW_KEY)

    def _cache_rows_wanted(self) -> bool:
        """Whether the training rows carry their ids: some phase runs cached (or the run length is not known yet)."""
        if self.cache_settings.activations is False or self.train_dataset is None:
            return False
        if self.data_plane is not None and self.data_plane.task in ("sft", "kto"):
            return False  # TRL's collator builds the batches (dpo: the trainer keys its pairs, see PairRows)
        return self.resolved is None or any(d.on for d in self._cache_decide())

    def get_train_dataloader(self):
        if not self._cache_rows_wanted():
            return super().get_train_dataloader()
        original = self.train_dataset
        self.train_dataset = with_row_ids(original)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = original

    def cache_model(self) -> CacheModel:
        blocks = self.rack.blocks
        units = self.rack.parameter_units()
        first = next((p for p in blocks.parameters() if p.is_floating_point()), None)
        return CacheModel.from_config(
            self._base_model().config,
            tuple(sum(p.numel() for p in block.parameters()) for block in blocks),
            sum(p.numel() for _, p in units.get(HEAD, [])),
            first.element_size() if first is not None else 4,
            sharded=bool(self.is_fsdp_enabled),
            neftune_noise_alpha=self.args.neftune_noise_alpha,
            lm_head=self._base_model().get_output_embeddings() is not None,
        )

    def cache_data(self) -> CacheData:
        args, phases = self.args, self.schedule.phases
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if self.data_plane is not None:
            seqs = tuple(self.data_plane.phase_length(p) for p in phases)
            chunk = self.data_plane.chunk_length(self.schedule)
            tasks = tuple(self.data_plane.phase_task(p) for p in phases)
        else:
            longest = longest_row(self.train_dataset) or 0
            seqs, chunk = (longest,) * len(phases), longest
            classifier = type(self._base_model()).__name__.endswith("ForSequenceClassification")
            tasks = ("classification" if classifier else "clm",) * len(phases)
        rows = dataset_rows(self.train_dataset) if chunk else None
        repeat, note = padding_repeat(self.train_dataset, self.data_collator, args.per_device_train_batch_size)
        return CacheData(rows, batch, seqs, chunk, tasks, repeat, note)

    def _cache_decide(self) -> list[PhaseCache]:
        if self.cache_decisions is None:
            self.cache_decisions = decide(
                self.schedule,
                self.resolved.bounds,
                self.layout,
                self._base,
                self.cache_settings,
                self.cache_model(),
                self.cache_data(),
                self.adapter_plan,
                self._prefix_hazard,
            )
            check_storage(self.cache_decisions, self.cache_settings, self._cache_folder(), self.args.world_size > 1)
        return self.cache_decisions

    def _prefix_hazard(self, prefix: tuple[int, ...]) -> str | None:
        """Why the modules below a cut after ``prefix`` are not replayable (stochastic, hooked), or None."""
        modules = prefix_modules(self._base_model(), self._base_topology["layers"], self.rack.blocks, prefix)
        return module_hazard(modules)

    def _cache_folder(self) -> str:
        return self.cache_settings.folder(self.args.output_dir)

    def _cache_phase(self, state) -> None:
        """At a phase start (or a resume inside it): the phase's replay, its stores signed by the current prefix."""
        self._replay = None
        if self.cache_settings.activations is False:
            return
        decision = self._cache_decide()[state.index]
        if not decision.on:
            return
        hazard = self._prefix_hazard(decision.prefix)  # again: hooks may come after the decision (NEFTune's)
        if hazard is not None:
            if self.cache_settings.activations is True:
                raise RecipeError(f"schedule[{state.index}]: {hazard}; set `cache.activations: auto` or false")
            logger.warning(f"[hf_stackwise] activation cache off in phase {state.name!r}: {hazard}")
            self.cache_decisions[state.index] = replace(decision, on=False, reason=hazard)
            return
        stores = {decision.cut: self._store(decision.prefix, decision)}
        exposed = tuple(c for c in self._cache_exposed_cuts(state) if 0 < c < decision.cut)
        for prefix in (*decision.fills, *(decision.prefix[:c] for c in exposed)):
            stores[len(prefix)] = self._store(prefix, decision)
        self._replay = Replay(decision, self.rack.blocks, stores, self._cache_counts, exposed)

    def _cache_exposed_cuts(self, state) -> tuple[int, ...]:
        """Cuts (blocks below them) below the phase's cut whose hidden state something reads during the forward;
        replayed on a hit as the cut's is. None here (the DPO trainer's ``shared`` reference adds its cut)."""
        return ()

    def _store(self, prefix: tuple[int, ...], decision: PhaseCache) -> ActivationStore:
        key = (prefix, decision.seq_length)
        store = self._stores.get(key)
        if store is None:
            hidden = self.cache_model().hidden
            path = None
            name = f"blocks{prefix[0]}-{prefix[-1]}x{len(prefix)}-seq{decision.seq_length}"
            stem = os.path.join(self._cache_folder(), f"{name}-{identity_key(self._cache_identity())}")
            if self._cache_shared():  # one store per node: this rank's segment, the other ranks' read
                os.makedirs(self._cache_folder(), exist_ok=True)
                rank, reload = self.args.process_index, self._cache_reload
                store = open_node_store(key, decision.slots, decision.seq_length, hidden, stem, rank, reload)
            elif self._ram_bytes + decision.bytes > self.cache_settings.max_memory:
                os.makedirs(self._cache_folder(), exist_ok=True)
                base = f"{stem}-{self._rank_tag()}"
                store = ActivationStore.open(key, decision.slots, decision.seq_length, hidden, base)
                store.reload = self._cache_reload
                if store.path != base:
                    logger.warning(f"[hf_stackwise] cache.dir: another run holds {base}; this run uses {store.path}")
            else:
                self._ram_bytes += decision.bytes
                store = ActivationStore(key, decision.slots, decision.seq_length, hidden, path)
            self._stores[key] = store
        store.sign(self._prefix_signature(prefix))
        if store.repaired:
            logger.warning(f"[hf_stackwise] {store.path}: {store.repaired} torn slots found on reload; they miss")
            store.repaired = 0
        return store

    def _prefix_signature(self, prefix: tuple[int, ...]) -> str:
        blocks = self.rack.blocks
        tensors = [p for _, p in self.rack.parameter_units()[EMBEDDINGS]]
        tensors += [p for b in prefix for p in blocks[b].parameters()]
        # the trainer has just checksummed every frozen parameter at this phase start: reuse those
        known = {id(p): self._fingerprints.get(n) for n, p in getattr(self, "_frozen", ())}
        missing = [t for t in tensors if known.get(id(t)) is None]
        known.update(zip((id(t) for t in missing), tensor_checksums(missing)))
        text = json.dumps([prefix, [str(known[id(t)]) for t in tensors], self._cache_identity()], sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _cache_identity(self) -> dict:
        """The run's identity besides the prefix weights (see :func:`~hf_stackwise.cache.store.run_identity`)."""
        first = next((p for p in self.rack.blocks.parameters() if p.is_floating_point()), None)
        compute = str(getattr(self.accelerator, "mixed_precision", None) or "no")
        return run_identity(self._base_model().config, first.dtype if first is not None else None, compute)

    def _cache_shared(self) -> bool:
        """Under DDP the ranks of a node share one store per cut (:mod:`~hf_stackwise.cache.node`)."""
        return self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _rank_tag(self) -> str:
        return f"rank{self.args.process_index}"

    def _cache_begin(self, resuming: bool) -> None:
        """At ``train()``: a resumed run may reload memory-mapped stores; ``overwrite_output_dir`` (a fresh run)
        removes the store files of this run's identity and process that an earlier run left in the cache folder (not
        one a running run holds)."""
        self._cache_reload = resuming
        self._stores, self._ram_bytes = {}, 0  # a store is opened (and locked) by the train() that uses it
        folder = self._cache_folder()
        if resuming or not self.args.overwrite_output_dir or not os.path.isdir(folder):
            return
        tag = f"-{identity_key(self._cache_identity())}-{self._rank_tag()}"  # what this run would have reloaded
        for name in sorted(os.listdir(folder)):
            stem, _, ext = name.rpartition(".")
            if ext == "lock" and name.startswith("blocks") and tag in stem and not _held(os.path.join(folder, name)):
                for suffix in ("data", "fp", "sum", "step", "json", "json.tmp", "lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, f"{stem}.{suffix}"))

    def _cache_end(self) -> None:
        """At the end of ``train()``: flush the memory-mapped stores and release their locks."""
        for store in self._stores.values():
            store.close()

    def _cache_inputs(self, inputs: dict) -> tuple[dict, dict | None]:
        """Remove the row ids from the batch; the replay modules for the arrangement, or None."""
        if ROW_KEY not in inputs:
            return inputs, None
        inputs = dict(inputs)
        rows = inputs.pop(ROW_KEY)
        if self._replay is None:
            return inputs, None
        self._replay.set_batch(rows, inputs, self.state.global_step)
        return inputs, self._replay.modules

    def cache_stats(self) -> dict:
        """This process's rows served from a store and rows looked up since the run (or resume) started, and the
        bytes stored: ``{hits, rows, hit_rate, bytes}``."""
        hits, rows = self._cache_counts
        stored = sum(s.nbytes for s in self._stores.values())
        return {"hits": hits, "rows": rows, "hit_rate": hits / rows if rows else 0.0, "bytes": stored}

    def _cache_logs(self, logs: dict) -> dict:
        """``cache/hit_rate`` (since the last log) and ``cache/bytes`` in a training log while a phase runs cached
        (none in the end-of-training summary, nor when no row was looked up since the last log)."""
        if self._replay is None or "loss" not in logs:
            return {}
        hits, rows = (now - then for now, then in zip(self._cache_counts, self._cache_log))
        self._cache_log = list(self._cache_counts)
        if not rows:
            return {}
        return {"cache/hit_rate": round(hits / rows, 6), "cache/bytes": self.cache_stats()["bytes"]}


def _held(lock_path: str) -> bool:
    """Whether a run holds the store whose lock file this is."""
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False
