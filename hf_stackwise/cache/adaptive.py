"""The cache decision for a cut that deepens inside a phase (``autofreeze``): the same exactness rules as
:func:`hf_stackwise.cache.policy.decide`, applied to the trainable units after a freeze, over the steps left in the
phase. Kept apart from the per-phase decisions, which it only reads."""

from __future__ import annotations

from .activations import Replay
from .policy import CacheData, CacheModel, CacheSettings, PhaseCache, _replace, _sized, blocker, frozen_prefix


def deeper_cut(
    static: PhaseCache,
    state,
    layout,
    settings: CacheSettings,
    model: CacheModel,
    data: CacheData,
    steps: tuple[int, int],
    adapters: dict | None = None,
) -> PhaseCache:
    """The decision from a freeze on: ``state`` is the phase's rack with the frozen units removed, ``steps`` the
    (first, one past last) steps it covers. ``auto`` turns the cache on when at least half the row visits in those
    steps are expected to hit (each row twice, its inputs repeating: a padding collator may change them); ``true``
    never raises here (the phase had no such prefix when the recipe was checked): a blocked prefix stays uncached with
    the reason. The phase's own (shallower) stores keep filling alongside."""
    index = state.index
    if settings.activations is False:
        return PhaseCache(index, False, reason="cache.activations: false")
    units, order = state.trainable_units, state.order
    cut_stacks, stop = frozen_prefix(units, order, layout, adapters or {})
    if not cut_stacks:
        return PhaseCache(index, False, reason=f"no frozen prefix: {stop}")
    blocked = blocker(data.tasks[index], units, model)
    if blocked:
        return PhaseCache(index, False, reason=blocked)
    decision = _sized(index, None, units, order, cut_stacks, layout, {index: steps}, model, data)
    if not decision.slots:
        return _replace(decision, on=False, reason="the number of training rows is not known (no row ids)")
    visits = decision.visits  # a row's first visit after the freeze misses; a later one hits if its inputs repeat
    hit = max(0.0, 1.0 - (1.0 + max(0.0, visits - 1.0) * (1.0 - data.repeat)) / visits) if visits else 0.0
    if settings.activations == "auto" and hit < 0.5:
        reason = f"each row is expected {visits:.2f} times after the freeze"
        if data.repeat < 1:
            reason += f" and {data.repeat_note}"
        return _replace(decision, on=False, reason=f"{reason}: expected hit rate {hit:.0%} (auto needs 50%)")
    shallower = [static.prefix, *static.fills] if static.on else []
    fills = tuple(p for p in dict.fromkeys(shallower) if 0 < len(p) < decision.cut)
    return _replace(decision, hit_rate=hit, fills=fills)


class DeepeningReplay(Replay):
    """The replay after a freeze deepened the cut: a batch whose rows are not all in the new cut's store but all in a
    shallower store of the phase (its own cut from before the freeze) starts there — the blocks below that cut pass
    the hidden state through, the stored state comes out at it, and the blocks up to the new cut run (under
    ``no_grad``) and fill the new store. Exact: the shallower store was computed by the same frozen blocks (its
    signature checks them) in the same dtype. ``shallow``: a one-element list counting the rows served that way."""

    def __init__(self, decision: PhaseCache, blocks, stores: dict, counts: list, shallow: list):
        super().__init__(decision, blocks, stores, counts)
        self.shallow = shallow
        self.start = 0
        self.stored = None  # the shallower store's rows of the micro-batch, copied at lookup
        self._taken = False

    def begin(self, length: int, device) -> None:
        if self._taken:  # `run` looked this batch up already
            self._taken = False
            return
        super().begin(length, device)
        self.start, self.stored = 0, None
        if self.hit or self.slots is None:
            return
        for cut in sorted((c for c in self.record if c < self.cut), reverse=True):
            store = self.record[cut]
            if store.match(self.slots, self.fps).all():
                self.stored = store.read(self.slots, length, device)
                if self.stored is None:  # another rank rewrote a row while it was copied
                    continue
                self.start = cut
                self.shallow[0] += len(self.slots)
                return

    def run(self, position: int, block, hidden, args, kwargs):
        if position == 0:
            self._taken = False
            self.begin(hidden.shape[1], hidden.device)
            self._taken = True
        if not self.hit and self.start and position < self.start:
            if position < self.start - 1:
                return (hidden,) if self.tuple_output else hidden
            stored, self.stored = self.stored, None
            return (stored,) if self.tuple_output else stored
        return super().run(position, block, hidden, args, kwargs)
