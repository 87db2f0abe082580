"""Run and checkpoint manifests, complete-checkpoint discovery, and the output-directory guard.

Standard library only. A checkpoint is a normal Trainer checkpoint plus ``stackwise_state.json``
(schedule hash, rack topology, phase). A run directory carries ``stackwise_run.json`` so a second run
never writes into a different run's output.
"""

from __future__ import annotations

import json
import os
import re

from .schedule import StackwiseError

MANIFEST_NAME = "stackwise_state.json"
RUN_MANIFEST_NAME = "stackwise_run.json"
RECIPE_NAME = "stackwise_recipe.yaml"  # the recipe a run was started with (overrides applied)
TRAINER_STATE_NAME = "trainer_state.json"  # written last by the Trainer: marks a complete checkpoint
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(StackwiseError):
    """A checkpoint cannot be resumed with this recipe; the message says what differs."""


class OutputDirError(StackwiseError):
    """The output directory holds something this run must not overwrite."""


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_identity(
    schedule: list[dict],
    rack: dict,
    total_steps: int | None,
    defaults: dict | None = None,
    adapters: dict | None = None,
) -> dict:
    """What makes two runs 'the same run' for resume and output-directory purposes.

    ``defaults`` are the training values phases fall back to (``learning_rate``, ``weight_decay``).
    """
    return {
        "format_version": FORMAT_VERSION,
        "schedule": schedule,
        "rack": rack,
        "total_steps": total_steps,
        "defaults": defaults or {},
        "adapters": adapters or {},
    }


def run_task(manifest: dict) -> str:
    """The task a run (or checkpoint) manifest trained (its data plane's), ``clm`` when it records none."""
    run = manifest.get("run", manifest)
    return ((run.get("defaults") or {}).get("data") or {}).get("task") or "clm"


def complete_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders that finished writing (both manifests present), oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return [
        path
        for _, path in sorted(found)
        if os.path.isfile(os.path.join(path, MANIFEST_NAME)) and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))
    ]


def last_complete_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(output_dir: str, resume_from_checkpoint: str | bool | None) -> str | None:
    """``True`` → the last complete checkpoint of ``output_dir`` (an error if there is none); ``False`` → None."""
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ResumeError(
                f"training.resume_from_checkpoint: true, but {output_dir!r} holds no complete checkpoint; "
                "set it to false to start a new run"
            )
        return checkpoint
    return None if resume_from_checkpoint is False else resume_from_checkpoint


def describe_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a saved and a current run identity."""
    changes = []
    old_phases, new_phases = saved.get("schedule", []), current.get("schedule", [])
    if len(old_phases) != len(new_phases):
        changes.append(f"schedule: {len(old_phases)} phases in the checkpoint, {len(new_phases)} in the recipe")
    for i, (old, new) in enumerate(zip(old_phases, new_phases, strict=False)):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changes.append(f"schedule[{i}].{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    old_defaults, new_defaults = saved.get("defaults", {}), current.get("defaults", {})
    for key in sorted(set(old_defaults) | set(new_defaults)):
        if old_defaults.get(key) != new_defaults.get(key):
            where = {"quantization": "model.quantization", "data": "data"}.get(key, f"training.{key}")
            why = "" if key in ("quantization", "data") else " (phases without their own value use it)"
            changes.append(f"{where}: {old_defaults.get(key)!r} in the checkpoint, {new_defaults.get(key)!r} now{why}")
    if saved.get("adapters", {}) != current.get("adapters", {}):
        changes.append(f"adapters: {saved.get('adapters')} in the checkpoint, {current.get('adapters')} now")
    if saved.get("rack") != current.get("rack"):
        changes.append(f"rack: {saved.get('rack')} in the checkpoint, {current.get('rack')} now")
    old_total, new_total = saved.get("total_steps"), current.get("total_steps")
    if old_total is not None and new_total is not None and old_total != new_total:
        changes.append(
            f"training.max_steps: the checkpoint's run has {old_total} steps, this one {new_total} "
            "(phase boundaries would move)"
        )
    return changes


def check_resumable(checkpoint: str, current: dict) -> dict:
    """Refuse a checkpoint that is incomplete, not ours, or from an edited recipe; returns its manifest."""
    manifest_path = os.path.join(checkpoint, MANIFEST_NAME)
    if not os.path.isdir(checkpoint):
        raise ResumeError(f"training.resume_from_checkpoint: {checkpoint!r} is not a directory")
    if not os.path.isfile(manifest_path):
        raise ResumeError(
            f"training.resume_from_checkpoint: {checkpoint!r} has no {MANIFEST_NAME}; it is not an hf_stackwise "
            "checkpoint (or it was not completely written); pick another checkpoint"
        )
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        raise ResumeError(
            f"training.resume_from_checkpoint: {checkpoint!r} was not completely written (no {TRAINER_STATE_NAME}); "
            "resume from an earlier checkpoint"
        )
    manifest = read_json(manifest_path)
    changes = describe_differences(manifest.get("run", {}), current)
    if changes:
        raise ResumeError(
            f"training.resume_from_checkpoint: {checkpoint!r} was written by a different recipe; resuming would "
            "not continue the same run. What changed:\n  " + "\n  ".join(changes) + "\nRestore the recipe, or "
            "start a new run in another `training.output_dir`."
        )
    return manifest


def check_output_dir(output_dir: str, current: dict, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run into a directory that holds another run's (or this run's) results."""
    if overwrite or resuming or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    run_manifest = os.path.join(output_dir, RUN_MANIFEST_NAME)
    fix = (
        "set `training.overwrite_output_dir: true` to replace it, `training.resume_from_checkpoint: true` to "
        "continue it, or choose another `training.output_dir`"
    )
    if not os.path.isfile(run_manifest):
        raise OutputDirError(f"training.output_dir: {output_dir!r} is not empty and holds no hf_stackwise run; {fix}")
    changes = describe_differences(read_json(run_manifest), current)
    if changes:
        raise OutputDirError(
            f"training.output_dir: {output_dir!r} holds a different run (" + "; ".join(changes) + f"); {fix}"
        )
    if complete_checkpoints(output_dir):
        raise OutputDirError(f"training.output_dir: {output_dir!r} already holds checkpoints of this run; {fix}")
