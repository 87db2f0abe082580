"""Run by tests/test_ddp_memory.py under `torchrun --nproc_per_node 2`: shards the tiny Llama with FSDP2
(`fully_shard` per block, then the root), trains stack 1 and the head for one step, and records what rank 0 holds:
its parameter shards plus buffers, and its gradient shards.
usage: python plan_shard_worker.py OUTPUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from conftest import tiny_causal_lm
from torch.distributed.fsdp import fully_shard


def local_bytes(tensors) -> int:
    return sum(t.to_local().numel() * t.element_size() for t in tensors)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("model.layers.1.", "model.norm.", "lm_head.")))
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    if dist.get_rank() == 0:
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        with open(f"{out}.tmp", "w") as f:
            json.dump({"weights": local_bytes(model.parameters()) + buffers, "gradients": local_bytes(grads)}, f)
        os.replace(f"{out}.tmp", out)  # complete or absent: an abort at exit loses nothing
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
