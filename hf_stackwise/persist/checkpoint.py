"""Run and checkpoint manifests, complete-checkpoint discovery, and the output-directory guard.

Standard library only. A checkpoint is a Trainer checkpoint (its weights stored as :mod:`hf_stackwise.persist.weights`
describes) plus ``stackwise_state.json`` (schedule hash, rack topology, phase) and, written atomically once
every other file of it is on disk, ``stackwise_complete.json`` (each file's size): a checkpoint killed at any
moment of writing, or with a file truncated later, is never taken. A run directory carries
``stackwise_run.json`` so a second run never writes into a different run's output.
"""

from __future__ import annotations

import json
import os
import re

from ..errors import StackwiseError

MANIFEST_NAME = "stackwise_state.json"
RUN_MANIFEST_NAME = "stackwise_run.json"
RECIPE_NAME = "stackwise_recipe.yaml"  # the recipe a run was started with (overrides applied)
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer's step counter and log history
COMPLETE_NAME = "stackwise_complete.json"  # written last: the checkpoint's files and their sizes
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


def checkpoint_files(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (relative path → size in bytes), the completion marker aside."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != COMPLETE_NAME and not name.endswith(".tmp"):
                files[rel] = os.path.getsize(path)
    return files


def mark_complete(folder: str, global_step: int) -> None:
    """Record that ``folder`` is completely written: the last file a checkpoint gets, atomically."""
    write_json(os.path.join(folder, COMPLETE_NAME), {"global_step": global_step, "files": checkpoint_files(folder)})


def unmark_complete(folder: str) -> None:
    """Before a checkpoint folder is (re)written: it is not complete until :func:`mark_complete` says so again."""
    if os.path.isfile(os.path.join(folder, COMPLETE_NAME)):
        os.remove(os.path.join(folder, COMPLETE_NAME))


def incomplete_reason(folder: str) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is).

    Complete: the completion marker is readable and every file it lists exists with the size it lists.
    A checkpoint of another format version (which predates the marker) only needs both manifests, so that
    readers can refuse it by its version."""
    for name in (MANIFEST_NAME, TRAINER_STATE_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"no {name}"
    try:
        marker = read_json(os.path.join(folder, COMPLETE_NAME))
    except (OSError, ValueError):
        try:
            version = read_json(os.path.join(folder, MANIFEST_NAME)).get("format_version")
        except (OSError, ValueError):
            version = None
        return None if version not in (None, FORMAT_VERSION) else f"no readable {COMPLETE_NAME}"
    for rel, size in marker.get("files", {}).items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def run_task(manifest: dict) -> str:
    """The task a run (or checkpoint) manifest trained (its data plane's), ``clm`` when it records none."""
    run = manifest.get("run", manifest)
    return ((run.get("defaults") or {}).get("data") or {}).get("task") or "clm"


def complete_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders that finished writing (see :func:`incomplete_reason`), oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found) if incomplete_reason(path) is None]


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


def _key_differences(path: str, old, new, then: str) -> list[str]:
    """``path.key: old <then>, new now`` for each leaf key that differs (not whole sections)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(set(old) | set(new), key=str)
            for line in _key_differences(f"{path}.{key}", old.get(key), new.get(key), then)
        ]
    return [] if old == new else [f"{path}: {old!r} {then}, {new!r} now"]


def describe_differences(saved: dict, current: dict, then: str = "in the checkpoint") -> list[str]:
    """Human-readable differences between a saved and a current run identity, one line per differing key."""
    changes = []
    old_phases, new_phases = saved.get("schedule", []), current.get("schedule", [])
    if len(old_phases) != len(new_phases):
        changes.append(f"schedule: {len(old_phases)} phases {then}, {len(new_phases)} in the recipe")
    for i, (old, new) in enumerate(zip(old_phases, new_phases, strict=False)):
        changes += _key_differences(f"schedule[{i}]", old, new, then)
    old_defaults, new_defaults = saved.get("defaults", {}), current.get("defaults", {})
    for key in sorted(set(old_defaults) | set(new_defaults)):
        where = {"quantization": "model.quantization", "data": "data"}.get(key, f"training.{key}")
        lines = _key_differences(where, old_defaults.get(key), new_defaults.get(key), then)
        why = "" if key in ("quantization", "data") else " (phases without their own value use it)"
        changes += [line + why for line in lines]
    changes += _key_differences("adapters", saved.get("adapters") or {}, current.get("adapters") or {}, then)
    rack_changes = _key_differences("rack", saved.get("rack") or {}, current.get("rack") or {}, then)
    changes += [line + " (from rack.blocks_per_stack / boundaries / layers)" for line in rack_changes]
    old_total, new_total = saved.get("total_steps"), current.get("total_steps")
    if old_total is not None and new_total is not None and old_total != new_total:
        changes.append(f"training.max_steps: {old_total} {then}, {new_total} now (phase boundaries would move)")
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
    reason = incomplete_reason(checkpoint)
    if reason is not None:
        raise ResumeError(
            f"training.resume_from_checkpoint: {checkpoint!r} was not completely written ({reason}); "
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
    replace = "set `training.overwrite_output_dir: true` to replace it, or choose another `training.output_dir`"
    if not os.path.isfile(run_manifest):
        raise OutputDirError(
            f"training.output_dir: {output_dir!r} is not empty and holds no hf_stackwise run; {replace}"
        )
    changes = describe_differences(read_json(run_manifest), current, then="in that run")
    if changes:
        raise OutputDirError(
            f"training.output_dir: {output_dir!r} holds a different run, which this recipe cannot continue ("
            + "; ".join(changes)
            + f"); {replace}"
            + (
                ", or restore those keys to continue that run with `training.resume_from_checkpoint: true`"
                if complete_checkpoints(output_dir)
                else ""
            )
        )
    if complete_checkpoints(output_dir):
        raise OutputDirError(
            f"training.output_dir: {output_dir!r} already holds checkpoints of this run; set "
            f"`training.resume_from_checkpoint: true` to continue it, or {replace[4:]}"
        )
