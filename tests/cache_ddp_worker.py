"""Run by tests/test_cache_node.py under `torchrun --nproc_per_node 2`: a frozen-prefix phase over 3 epochs, with the
activation cache on or off; saves each rank's final weights, optimizer state, losses, cache counts and store files.
usage: python cache_ddp_worker.py OUTPUT_DIR on|off [PER_DEVICE_BATCH [CACHE_DIR]]
(batch: default 2; 4 in one process: the same steps; cache dir: default OUTPUT_DIR/activation-cache)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from conftest import tiny_causal_lm
from datasets import Dataset

from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

TOP = [{"name": "top", "until": 1.0, "train": "top", "head": "train"}]


def main(output_dir: str, cache: str, batch: str = "2", cache_dir: str | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (16, 32), generator=g).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = StackwiseArguments(
        output_dir=output_dir,
        max_steps=12,
        per_device_train_batch_size=int(batch),  # 2 on 2 ranks: global batch 4, 4 steps per epoch over 16 rows
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        blocks_per_stack=1,
        schedule=TOP,
        activation_cache={"activations": cache == "on", "dir": cache_dir},
    )
    trainer = StackwiseTrainer(model=tiny_causal_lm("llama", layers=4), args=args, train_dataset=dataset)
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(
        {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()["state"]},
        os.path.join(output_dir, f"rank{rank}.pt"),
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        stores = sorted(store.path for store in trainer._stores.values() if store.path is not None)
        json.dump({"losses": losses, "cache": trainer.cache_stats(), "world": args.world_size, "stores": stores}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
