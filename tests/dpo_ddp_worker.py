"""Run by tests/test_dpo_ddp.py, under `torchrun --nproc_per_node 2` or as one plain process.

Trains a tiny Llama with DPO through two phases (top stack, then the two top stacks), once with the `shared`
reference and once with `copy`, and saves each rank's final weights and logged losses per way.
usage: python dpo_ddp_worker.py OUTPUT_DIR PER_DEVICE_BATCH
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from conftest import build_tokenizer, tiny_causal_lm
from datasets import Dataset
from demo_assets import preference_pairs
from test_dpo import dpo_args

from hf_stackwise.integrations.dpo_trainer import StackwiseDPOTrainer

SCHEDULE = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "upper", "until": 1.0, "train": [2, 3]}]


def main(output_dir: str, per_device: int) -> None:
    tokenizer = build_tokenizer()
    rows = [{k: v[:160] for k, v in r.items()} for r in preference_pairs()[:32]]
    rank = int(os.environ.get("RANK", "0"))
    for way in ("shared", "copy"):
        args = dpo_args(
            output_dir,
            way,
            way,
            schedule=SCHEDULE,
            per_device_train_batch_size=per_device,
            learning_rate=1e-4,  # AdamW: a 1e-3 step turns last-bit gradient differences into 1e-5
            pad_to_multiple_of=96,  # every batch the same shape, on 2 ranks of 2 pairs as in 1 process of 4
            disable_tqdm=True,
        )
        trainer = StackwiseDPOTrainer(
            model=tiny_causal_lm("llama", layers=4),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        trainer.train()
        weights = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}
        torch.save(weights, os.path.join(output_dir, f"{way}-rank{rank}.pt"))
        logged = [{"loss": h["loss"], "phase": h["phase"]} for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(output_dir, f"{way}-log{rank}.json"), "w") as f:
            json.dump({"world_size": args.world_size, "log": logged}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    main(sys.argv[1], int(sys.argv[2]))
