"""Run by tests/test_ddp_memory.py under `torchrun --nproc_per_node 2`: a block-coordinate schedule (one stack
trains at a time, two micro-batches per step) on a tiny Llama, recording after every step the DDP reducer's
gradient-bucket bytes and the bytes of the parameters that train; saves each rank's final weights.
usage: python ddp_memory_worker.py OUTPUT_DIR [phase|superset] [CHECKPOINT_TO_RESUME]
`superset` turns the per-phase re-registration off: DDP keeps the buckets of every parameter it wrapped (the
behaviour before it existed), the reference the per-phase reducer must equal bitwise.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from conftest import tiny_causal_lm
from datasets import Dataset
from transformers import TrainerCallback

import hf_stackwise.trainer as trainer_module
from hf_stackwise.distributed.ddp import bucket_bytes
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

SCHEDULE = [
    {"name": "s3", "until": 0.25, "train": [3]},
    {"name": "s1", "until": 0.5, "train": [1], "embeddings": "train"},
    {"name": "s0", "until": 0.75, "train": [0]},
    {"name": "s2", "until": 1.0, "train": [2], "head": "train"},
]


class Buckets(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.rows = []

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self.rows.append([state.global_step - 1, bucket_bytes(model), trainable])


def main(output_dir: str, mode: str, resume: str | None = None) -> None:
    if mode == "superset":
        trainer_module.register_trainable = lambda ddp: False
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (96, 32), generator=g).tolist()
    args = StackwiseArguments(
        output_dir=output_dir,
        max_steps=8,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,  # a transition's first micro-batch runs under DDP's no_sync
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=3,  # step 3 is inside phase s1: a resume starts mid-phase
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=SCHEDULE,
        blocks_per_stack=1,
        logging_steps=1,
        dataloader_drop_last=True,
        # the superset reducer holds frozen stacks, which produce no gradient: it needs the search (as it did)
        ddp_find_unused_parameters=True if mode == "superset" else None,
    )
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = StackwiseTrainer(model=tiny_causal_lm("llama"), args=args, train_dataset=data)
    buckets = Buckets(trainer)
    trainer.add_callback(buckets)
    trainer.train(resume_from_checkpoint=resume)
    rank = int(os.environ.get("RANK", "0"))
    tag = "resumed" if resume else mode
    torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{output_dir}/{tag}{rank}.pt")
    with open(f"{output_dir}/{tag}{rank}.json", "w") as f:
        json.dump({"buckets": buckets.rows, "world_size": args.world_size}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
