"""``push_to_hub`` of a run: the Hub gets the run's *export* (a plain model folder with its model card), not the
training folder, through the Trainer's own Hub client, repository (``hub_model_id``, ``init_hf_repo``), token and
revision.

``training.push_to_hub: true`` in a recipe makes the Trainer create the repository when it is built, push at each
save according to ``hub_strategy`` (its own mechanism, unchanged: ``checkpoint`` / ``all_checkpoints`` keep
resumable checkpoints on the Hub) and, at the final ``save_model``, call ``StackwiseTrainer.push_to_hub``, which
lands here: export ``output_dir`` into ``output_dir/_export`` (the Trainer's pushes skip ``_*``) and upload exactly
that folder. Files an earlier checkpoint push left at the repository's root and the export does not have (training
arguments, adapter files, the unexported weights of other blocks) are deleted in the same commit, so the
repository's root is the export folder; checkpoint folders on the Hub are kept.
"""

from __future__ import annotations

import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils.hub import hf_api

from .folder import export

EXPORT_DIR = "_export"


def stale_patterns(output_dir: str) -> list[str]:
    """What the Trainer's checkpoint pushes may have uploaded from ``output_dir``: its top-level entries except
    ``_*`` and checkpoint folders (the same ignore patterns the Trainer uses)."""
    patterns = []
    for name in sorted(os.listdir(output_dir)):
        if name.startswith("_") or name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
            continue
        patterns.append(f"{name}/*" if os.path.isdir(os.path.join(output_dir, name)) else name)
    return patterns


def push_export(
    trainer,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
):
    """Save the final model, export it to ``output_dir/_export`` and upload that folder to ``hub_model_id``."""
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    token = token if token is not None else args.hub_token
    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token, private=private)
    trainer.save_model(_internal_call=True)
    trainer.save_manifest()
    if not trainer.is_world_process_zero():
        return None
    trainer.save_state()  # the log history, for the card's loss plot
    folder = os.path.join(args.output_dir, EXPORT_DIR)
    export(args.output_dir, folder, overwrite=True, name=trainer.hub_model_id.split("/")[-1])
    trainer._finish_current_push()  # as Trainer.push_to_hub: wait for a checkpoint push still running
    return hf_api().upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        run_as_future=not blocking,
        revision=revision if revision is not None else args.hub_revision,
        delete_patterns=stale_patterns(args.output_dir),
    )
