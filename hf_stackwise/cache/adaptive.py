"""The cache decision for a cut that deepens inside a phase (``autofreeze``): the same exactness rules as
:func:`hf_stackwise.cache.policy.decide`, applied to the trainable units after a freeze, over the steps left in the
phase. Kept apart from the per-phase decisions, which it only reads."""

from __future__ import annotations

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
    (first, one past last) steps it covers. ``auto`` turns the cache on when each row is expected twice in those
    steps; ``true`` never raises here (the phase had no such prefix when the recipe was checked): a blocked prefix
    stays uncached with the reason. The phase's own (shallower) stores keep filling alongside."""
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
    if settings.activations == "auto" and decision.visits < 2:
        reason = f"each row is expected {decision.visits:.2f} times after the freeze (auto needs 2)"
        return _replace(decision, on=False, reason=reason)
    hit = max(0.0, 1.0 - 1.0 / decision.visits) if decision.visits else 0.0
    shallower = [static.prefix, *static.fills] if static.on else []
    fills = tuple(p for p in dict.fromkeys(shallower) if 0 < len(p) < decision.cut)
    return _replace(decision, hit_rate=hit, fills=fills)
