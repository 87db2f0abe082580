"""Run by tests/test_ddp.py, under `torchrun --nproc_per_node 2` or as one plain process.

Trains a tiny Llama through transitions that freeze and unfreeze stacks, records the phase trace from
the parameters' own `requires_grad` flags, and saves each rank's final weights and trace.
usage: python ddp_worker.py OUTPUT_DIR PER_DEVICE_BATCH [full|dual|grow|grow_adam|sample|autofreeze]
(`grow_adam`: the growth schedule with AdamW and lr 1e-3, for benchmarks/ddp_tolerance.py)
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

from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

SCHEDULE = [
    {"name": "top", "until": 0.25, "train": ["top"]},
    {"name": "bottom", "until": 0.5, "train": [0, 1], "embeddings": "train"},
    {"name": "shallow", "until": 0.75, "stacks": 2, "train": [1], "head": "train"},
    {"name": "all", "until": 1.0, "train": "all"},
]


DUAL = [  # LoRA variant: full top + trunk adapter, then a stack adapter, then another (adapters switch on and off)
    {"name": "top", "until": 0.25, "train": ["top"], "trunk": "lora"},
    {"name": "s1", "until": 0.5, "train": [1], "adapter": "lora", "trunk": "lora"},
    {"name": "s0", "until": 0.75, "train": [0], "adapter": "lora"},
    {"name": "all", "until": 1.0, "train": "all"},
]

GROW = [  # growth variant: prepend a copy, insert an identity stack, add a random top stack (blocks pre-allocated)
    {"name": "base", "until": 0.25, "train": "all"},
    {"name": "below", "until": 0.5, "grow": {"op": "copy", "stacks": 1, "at": "bottom"}, "train": "new"},
    {"name": "pro", "until": 0.75, "grow": {"op": "identity", "at": [2]}, "train": ["new", "top"]},
    {"name": "all", "until": 1.0, "grow": {"op": "random", "stacks": 1}, "train": "all", "optimizer_state": "reset"},
]

SAMPLE = [  # generator variant: a LISA-style `sample` after a top-only warm-up, idle stacks' state released
    {"name": "warm", "until": 0.25, "train": ["top"]},
    {
        "name": "lisa",
        "until": 1.0,
        "sample": {"pool": "all", "k": 2, "every": 0.25, "seed": 0},
        "optimizer_state": "release_idle",
    },
]

AUTOFREEZE = [  # adaptive freezing: stacks freeze bottom-up from all-reduced gradient statistics, state released
    {
        "name": "auto",
        "until": 1.0,
        "train": "all",
        "optimizer_state": "release_idle",
        "autofreeze": {"every": 2, "warmup": 2, "percentile": 75},
    },
]


class Trace(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.rows = []

    def on_step_end(self, args, state, control, **kwargs):
        base = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
        layers = base.model.layers
        stacks = [i for i in range(len(layers)) if any(p.requires_grad for p in layers[i].parameters())]
        self.rows.append([state.global_step - 1, stacks])


def main(output_dir: str, batch: int, variant: str = "full") -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (96, 32), generator=g).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = tiny_causal_lm("llama")
    args = StackwiseArguments(
        output_dir=output_dir,
        max_steps=8,
        per_device_train_batch_size=batch,
        learning_rate=5e-2 if variant in ("dual", "grow") else 1e-3,  # grow_adam: Adam's usual 1e-3
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule={"dual": DUAL, "grow": GROW, "grow_adam": GROW, "sample": SAMPLE, "autofreeze": AUTOFREEZE}.get(
            variant, SCHEDULE
        ),
        adapters={"r": 4, "alpha": 8, "trunk_r": 2} if variant == "dual" else None,
        # SGD for the adapter variant: Adam divides near-zero LoRA-A gradients (B starts at 0) by their own
        # magnitude, turning float-reordering noise between 1 and 2 processes into visible weight differences; the
        # same happens to every parameter after growth's `optimizer_state: reset` (Adam's first step is g / |g|)
        optim="sgd" if variant in ("dual", "grow", "sample") else "adamw_torch",
        optim_args="momentum=0.9" if variant == "sample" else None,  # `release_idle` needs per-parameter state
        blocks_per_stack=1,
        logging_steps=1,
        dataloader_drop_last=True,
    )
    trainer = StackwiseTrainer(model=model, args=args, train_dataset=dataset)
    trace = Trace(trainer.model)
    trainer.add_callback(trace)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{output_dir}/rank{rank}.pt")
    with open(f"{output_dir}/trace{rank}.json", "w") as f:
        decisions = trainer.freeze_decisions()
        json.dump({"trace": trace.rows, "world_size": args.world_size, "freeze_decisions": decisions}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
