"""The DPO reference model's ways (``training.reference``) and the cut a ``shared`` reference forwards from: pure
functions of (schedule, rack), standard library only, so ``plan`` and the recipe checks see the same answer as
the trainer.

The cut of phase i is the lowest stack that trains (its weights, a LoRA adapter or trunk LoRA) in any phase up to
and including i: every block below it still holds its initial weights, so the policy's hidden state there *is*
the reference's. The run's cut (the last phase's) is the lowest stack that trains at any point; the blocks below it
are frozen in every phase, which the trainer's frozen-checksum invariant checks at each transition.
"""

from __future__ import annotations

from .phases import EMBEDDINGS, HEAD, RecipeError, unit_level

# auto: the cheapest exact way (precompute for a map-style dataset, else shared when some prefix never trains, else
# copy); copy: TRL's frozen full copy; precompute: TRL's precompute_ref_log_probs; shared: see the module docstring
REFERENCES = ("auto", "copy", "precompute", "shared")


def lowest_trained(units, num_stacks: int, tied: bool = False) -> int:
    """Stacks below the lowest one that ``units`` train (0 when the embeddings, or a head tied to them, train)."""
    if EMBEDDINGS in units or (tied and HEAD in units):
        return 0
    return min((unit_level(u) for u in units if u.startswith("stack_")), default=num_stacks)


def reference_cuts(schedule, sizes: tuple[int, ...], tied: bool = False) -> list[int]:
    """Per phase, the stacks below the cut a ``shared`` reference forwards from (non-increasing over phases)."""
    cuts, low = [], len(sizes)
    for units in schedule.phase_units(sizes):
        low = min(low, lowest_trained(units, len(sizes), tied))
        cuts.append(low)
    return cuts


def check_shared(schedule, sizes: tuple[int, ...], tied: bool = False) -> None:
    """``shared`` needs a prefix that never trains: name the first phase that trains stack 0 or the embeddings."""
    for index, units in enumerate(schedule.phase_units(sizes)):
        if lowest_trained(units, len(sizes), tied):
            continue
        if EMBEDDINGS in units:
            what, key = "the embeddings", "embeddings"
        elif "stack_0.trunk" in units:
            what, key = "stack 0 through trunk LoRA", "trunk"
        elif "stack_0.lora" in units:
            what, key = "a LoRA adapter on stack 0", "adapter"
        elif "stack_0" in units:
            what, key = "stack 0", "train"
        else:
            what, key = "the head, which is tied to the input embeddings,", "head"
        raise RecipeError(
            f"training.reference: `shared` reuses the policy's hidden state below the lowest stack that trains in any "
            f"phase, but phase {index} ({schedule.key_path(index, key)}) trains {what}, so no block stays at its "
            "initial weights for the whole run and there is nothing to share; use `reference: copy` or "
            "`precompute`, or keep the bottom stack (and the embeddings) frozen in every phase"
        )


def check_dpo_schedule(schedule, sizes: tuple[int, ...]) -> None:
    """The reference is the model as loaded: refuse growth and a reduced active depth (the policy would not be the
    architecture the reference runs)."""
    problems = []
    for index, phase in enumerate(schedule.phases):
        if phase.grow is not None:
            problems.append(
                f"{schedule.key_path(index, 'grow')}: `data.task: dpo` compares the policy with the model as loaded "
                "(the reference), and growth changes the architecture; grow in an earlier `clm`/`sft` run"
            )
        if phase.stacks is not None and phase.stacks < len(sizes):
            problems.append(
                f"{schedule.key_path(index, 'stacks')}: `data.task: dpo` runs the whole rack (the reference is the "
                "model as loaded); drop `stacks`"
            )
    if problems:
        raise RecipeError(problems)
