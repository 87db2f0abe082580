"""Run by tests/test_fsdp_adapters.py, under `torchrun --nproc_per_node 2` (FSDP2, forced as in fsdp_worker.py) or
as one plain process: growth and LoRA schedules (ddp_worker.py's GROW and DUAL) on a tiny Llama loaded from a folder.

Per case: the weights after every step and the phase trace (Record), checkpoints every 3 steps (3 and 6 are inside
phases), the final save, then (SGD cases) a resumed copy from checkpoint-3; the AdamW cases again under DDP.
usage: python fsdp_adapters_worker.py ROOT fsdp|single [CASE...]  (ROOT/base holds the tiny Llama)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist
from ddp_worker import DUAL, GROW
from fsdp_worker import FSDP_CONFIG, ForcedFSDP, dataset, full
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_stackwise.rack.quantization import bnb_config
from hf_stackwise.trainer import StackwiseArguments, StackwiseTrainer

BLOCK = re.compile(r"\.layers\.(\d+)\.")


class Record(TrainerCallback):
    """Every rank: the blocks with trainable parameters (adapters included) per step; full tensors after every step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.trace, self.steps, self.grad_bytes = [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """This rank's gradient bytes (its shards under FSDP2) just before the update."""
        self.grad_bytes.append(sum(_local_bytes(p.grad) for _, p, _ in self.trainer._params if p.grad is not None))

    def on_step_end(self, args, state, control, **kwargs):
        params = self.trainer._params
        blocks = {int(m.group(1)) for n, p, _ in params if p.requires_grad and (m := BLOCK.search(n))}
        self.trace.append([state.global_step - 1, sorted(blocks)])
        self.steps.append({n: full(p) for n, p, _ in params})


QLORA = [  # a 4-bit base: stack and trunk adapters, then another stack's adapter with the (full-precision) head
    {"name": "trunk", "until": 0.5, "train": ["top"], "adapter": "lora", "trunk": "lora"},
    {"name": "s0", "until": 1.0, "train": [0], "adapter": "lora", "head": "train"},
]
QLORA_GROW = [  # LLaMA Pro on a 4-bit base: a trunk adapter, then an identity stack (full precision) copied from a
    # 4-bit block inside the rack, trained with the trunk adapter
    {"name": "trunk", "until": 0.5, "train": ["top"], "adapter": "lora", "trunk": "lora"},
    {"name": "pro", "until": 1.0, "grow": {"op": "identity", "at": [2]}, "train": "new", "trunk": "lora"},
]
LORA = {"r": 4, "alpha": 8, "trunk_r": 2}
QUANTIZATION = {"bits": 4, "quant_type": "nf4", "double_quant": True}
CASES = {  # case -> schedule, adapter settings, optimizer
    "grow": (GROW, None, "sgd"),
    "dual": (DUAL, LORA, "sgd"),
    "qlora": (QLORA, LORA, "sgd"),
    "qlora_grow": (QLORA_GROW, LORA, "sgd"),
    "qlora_bf16": (QLORA, LORA, "sgd"),  # bf16 mixed precision and a bf16-compute 4-bit base (bfloat16 storage)
    "grow_adamw": (GROW, None, "adamw_torch"),
    "dual_adamw": (DUAL, LORA, "adamw_torch"),
}
RESUMED = ("grow", "dual", "qlora")  # the cases also resumed from their checkpoint-3


def run(root: str, case: str, sharded: bool, resume: str | None = None, name: str | None = None) -> None:
    output_dir = f"{root}/{name or (case if sharded else 'single_' + case)}"
    schedule, adapters, optim = CASES[case]
    sgd = optim == "sgd"
    torch.manual_seed(0)
    quantization = {}
    bf16 = case.endswith("_bf16")
    if case.startswith("qlora"):  # storage as `hf-stackwise train` picks it (auto under FSDP2: float32, or bfloat16
        # with bf16; else uint8)
        settings = {**QUANTIZATION, "compute_dtype": "bfloat16"} if bf16 else QUANTIZATION
        quantization["quantization_config"] = bnb_config(settings, ["lm_head"], {"fsdp": sharded, "bf16": bf16})
    model = AutoModelForCausalLM.from_pretrained(f"{root}/base", **quantization)
    args = StackwiseArguments(
        output_dir=output_dir,
        max_steps=8,
        per_device_train_batch_size=4 // int(os.environ.get("WORLD_SIZE", "1")),  # global batch 4
        learning_rate=5e-2 if sgd else 1e-3,
        optim=optim,
        optim_args="momentum=0.9" if sgd else None,
        # AdamW without clipping: the clip's total norm sums shard norms in another order (as in fsdp_worker.py)
        max_grad_norm=1.0 if sgd else 0.0,
        report_to="none",
        use_cpu=True,
        seed=0,
        schedule=schedule,
        adapters=adapters,
        blocks_per_stack=1,
        logging_steps=1,
        dataloader_drop_last=True,
        save_strategy="steps",
        save_steps=3,
        fsdp=sharded,
        fsdp_config=FSDP_CONFIG if sharded else None,
        bf16=bf16,
    )
    trainer = (ForcedFSDP if sharded else StackwiseTrainer)(model=model, args=args, train_dataset=dataset())
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # as `hf-stackwise train` ends (FSDP2: gathered on rank 0)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        torch.save({"final": record.steps[-1], "steps": record.steps}, f"{output_dir}/weights.pt")
    with open(f"{output_dir}/trace{rank}.json", "w") as f:
        optimized = [(n, p) for n, p in trainer.model.named_parameters() if any(p is q for q in _optimized(trainer))]
        info = {
            "trace": record.trace,
            "fsdp": trainer.is_fsdp_enabled,
            "world_size": args.world_size,
            "optimized": len(optimized),
            "optimized_dtensors": sum(isinstance(p, DTensor) for _, p in optimized),
            "lora_dtensors": sum(isinstance(p, DTensor) for n, p in optimized if "lora_" in n),
            "lora": sum("lora_" in n for n, _ in optimized),
            "weights_4bit": {  # the packed 4-bit base weights: dtype, whether sharded, this rank's bytes
                n: [str(p.dtype), isinstance(p, DTensor), _local_bytes(p)]
                for n, p in trainer.model.named_parameters()
                if "base_layer" in n and n.endswith("weight") and p.shape[-1] == 1
            },
            "local_bytes": sum(_local_bytes(p) for _, p in trainer.model.named_parameters()),
            "buffer_bytes": sum(_local_bytes(b) for b in trainer.model.buffers()),
            "quant_state_bytes": sum(_state_bytes(m.quant_state) for m in trainer.model.modules() if _is_4bit(m)),
            "grad_bytes": record.grad_bytes,
        }
        json.dump(info, f)


def _is_4bit(module) -> bool:
    return type(module).__name__ == "Linear4bit" and getattr(module, "quant_state", None) is not None


def _state_bytes(state) -> int:
    """A 4-bit weight's quantization state: absmax, code table and offset, and the double quantization's own."""
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if isinstance(p, DTensor) else p
    return local.numel() * local.element_size()


def _optimized(trainer) -> list:
    return [p for g in trainer.optimizer.param_groups for p in g["params"]]


def resumed_copy(root: str, case: str) -> str:
    """A copy of the run holding only its checkpoint-3 (rank 0 copies; every rank waits)."""
    source, target = f"{root}/{case}", f"{root}/{case}_resumed"
    if int(os.environ.get("RANK", "0")) == 0:
        keep = ("checkpoint-3", "stackwise_run.json")

        def ignore(folder, names):
            return [n for n in names if n not in keep] if folder == source else []

        shutil.copytree(source, target, ignore=ignore)
    if dist.is_initialized():
        dist.barrier()
    return f"{target}/checkpoint-3"


def main(root: str, mode: str, *cases: str) -> None:
    sharded = mode == "fsdp"
    for case in cases or CASES:
        run(root, case, sharded)
        if sharded and case in RESUMED:
            run(root, case, sharded, resume=resumed_copy(root, case), name=f"{case}_resumed")
    if sharded:  # the AdamW reference: real DDP in the same process group (accelerate's state reset to MULTI_CPU)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by the FSDP runs' Accelerator
        for case in [c for c in cases or CASES if CASES[c][2] != "sgd"]:
            run(root, case, False, name=f"ddp_{case}")
    with open(f"{root}/{mode}.done", "w") as f:  # every result is written (an abort at exit loses nothing)
        f.write(os.environ.get("RANK", "0"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
