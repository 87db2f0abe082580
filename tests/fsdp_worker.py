"""Run by tests/test_fsdp.py, under `torchrun --nproc_per_node 2` (FSDP2 or DDP) or as one plain process.

Trains a tiny Llama through transitions that freeze and unfreeze stacks (the schedule of ddp_worker.py) and saves,
per case, the final weights, the weights after every step, the phase trace and what the optimizer holds.
usage: python fsdp_worker.py OUTPUT_DIR fsdp|single  (fsdp: 2 ranks, FSDP2 cases then the DDP reference)

On CPU, accelerate runs DDP even when FSDP is asked for (`use_cpu=True` keeps the MULTI_CPU distributed type):
`ForcedFSDP` sets the FSDP distributed type and plugin on accelerate's shared state after the Trainer built its
Accelerator, so the real FSDP2 path (`fully_shard`, sharded optimizer, FSDP checkpoints) runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from conftest import tiny_causal_lm
from datasets import Dataset
from ddp_worker import AUTOFREEZE, SCHEDULE
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

FSDP_CONFIG = {"version": 2, "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}


def force_fsdp_plugin(trainer) -> None:
    """Make accelerate's shared state run FSDP (as it would on GPUs) for this CPU process group."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state = AcceleratorState()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class ForcedFSDP(StackwiseTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        force_fsdp_plugin(self)


def full(param: torch.Tensor) -> torch.Tensor:
    return (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()


class Record(TrainerCallback):
    """Every rank: the blocks with trainable parameters per step; the full weights after every step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.trace, self.steps = [], []

    def on_step_end(self, args, state, control, **kwargs):
        layers = [n for n, _, _ in self.trainer._params]
        trainable = sorted(
            {int(n.split(".")[2]) for n, p, _ in self.trainer._params if p.requires_grad and ".layers." in n}
        )
        self.trace.append([state.global_step - 1, trainable])
        self.steps.append({n: full(p) for n, (_, p, _) in zip(layers, self.trainer._params)})


def dataset() -> Dataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (96, 32), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def run(
    output_dir: str, batch: int, sharded: bool, optim: str, resume: str | None = None, schedule=SCHEDULE, **extra
) -> None:
    torch.manual_seed(0)
    model = tiny_causal_lm("llama")
    if extra.get("bf16"):
        model = model.to(torch.bfloat16)
    args = StackwiseArguments(
        output_dir=output_dir,
        max_steps=8,
        per_device_train_batch_size=batch,
        learning_rate=1e-3 if optim == "adamw_torch" else 5e-2,
        optim=optim,
        optim_args="momentum=0.9" if optim == "sgd" else None,
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=schedule,
        blocks_per_stack=1,
        logging_steps=1,
        dataloader_drop_last=True,
        fsdp=sharded,
        fsdp_config=FSDP_CONFIG if sharded else None,
        # AdamW runs compare with DDP without clipping: the clip's total norm sums shard norms in another order, and
        # Adam turns that last-bit difference of the clip factor into 1e-6 weight differences (measured: 1.5e-6)
        **{"save_strategy": "no", "max_grad_norm": 0.0 if optim == "adamw_torch" else 1.0, **extra},
    )
    evals = dataset().select(range(8)) if args.eval_strategy != "no" else None
    trainer = (ForcedFSDP if sharded else StackwiseTrainer)(
        model=model, args=args, train_dataset=dataset(), eval_dataset=evals
    )
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train(resume_from_checkpoint=resume)
    if args.save_strategy == "steps":  # as `hf-stackwise train` ends: the final model (FSDP2: gathered on rank 0)
        trainer.save_model()
    rank = int(os.environ.get("RANK", "0"))
    optimized = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    if rank == 0:
        torch.save({"final": record.steps[-1], "steps": record.steps}, f"{output_dir}/weights.pt")
    with open(f"{output_dir}/trace{rank}.json", "w") as f:
        info = {
            "trace": record.trace,
            "world_size": args.world_size,
            "fsdp": trainer.is_fsdp_enabled,
            "wrapped": type(trainer.model_wrapped).__name__,
            "optimized": len(optimized),
            "optimized_dtensors": sum(isinstance(p, DTensor) for p in optimized),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in optimized),
            "freeze_decisions": trainer.freeze_decisions(),
        }
        json.dump(info, f)


def main(root: str, mode: str) -> None:
    if mode == "fsdp":
        run(f"{root}/adamw", 2, True, "adamw_torch", save_strategy="steps", save_steps=3)
        resumed = f"{root}/resumed"
        if int(os.environ["RANK"]) == 0:  # resume a copy of the run from its mid-phase checkpoint
            keep = ("checkpoint-3", "stackwise_run.json")
            shutil.copytree(
                f"{root}/adamw",
                resumed,
                ignore=lambda d, names: [] if d != f"{root}/adamw" else [n for n in names if n not in keep],
            )
        dist.barrier()
        run(resumed, 2, True, "adamw_torch", resume=f"{resumed}/checkpoint-3", save_strategy="steps", save_steps=3)
        # evaluations before the first step and inside phases: forwards that leave unsharded parameters behind
        run(f"{root}/evals", 2, True, "adamw_torch", eval_strategy="steps", eval_steps=3, eval_on_start=True)
        run(f"{root}/sgd", 2, True, "sgd")
        run(f"{root}/autofreeze", 2, True, "sgd", schedule=AUTOFREEZE)  # freezes decided from sharded gradients
        run(f"{root}/bf16", 2, True, "adamw_torch", bf16=True, max_grad_norm=1.0)
        # the DDP reference in the same process group: accelerate's shared state is reset to plain MULTI_CPU
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by the FSDP runs' Accelerator
        run(f"{root}/ddp", 2, False, "adamw_torch")
    else:
        run(f"{root}/single_sgd", 4, False, "sgd")
        run(f"{root}/single_autofreeze", 4, False, "sgd", schedule=AUTOFREEZE)
        run(f"{root}/single_adamw", 4, False, "adamw_torch", save_strategy="steps", save_steps=3)
    with open(f"{root}/{mode}.done", "w") as f:  # every result is written (an abort at exit loses nothing)
        f.write(os.environ.get("RANK", "0"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
