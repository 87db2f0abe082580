"""Growth, LoRA and 4-bit (QLoRA) bases under FSDP2 with 2 real CPU ranks (torchrun, gloo, the FSDP plugin forced as
in test_fsdp.py), each against one process running the same schedule: weights after every step, resume from a
mid-phase checkpoint, checkpoints and exports. One launch of fsdp_adapters_worker.py per world size serves every
test here."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from fsdp_adapters_worker import LORA, QLORA, QUANTIZATION
from safetensors.torch import load_file
from test_fsdp import launch

from hf_stackwise.cli.plan import make_plan
from hf_stackwise.cli.plan_memory import per_rank
from hf_stackwise.export.folder import export
from hf_stackwise.recipe.loader import load_recipe

WORKER = "fsdp_adapters_worker.py"
GROW_TRACE = [[0, [0, 1, 2, 3]], [1, [0, 1, 2, 3]], [2, [4]], [3, [4]], [4, [3, 5]], [5, [3, 5]]] + [
    [s, list(range(7))] for s in (6, 7)
]
DUAL_TRACE = [[s, [0, 1, 2, 3]] for s in range(4)] + [[4, [0]], [5, [0]], [6, [0, 1, 2, 3]], [7, [0, 1, 2, 3]]]
QLORA_TRACE = [[s, [0, 1, 2, 3]] for s in range(4)] + [[s, [0]] for s in range(4, 8)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("fsdp_adapters")
    shutil.copytree(tiny_llama_dir, root / "base")  # tiny_causal_lm("llama") with the tiny tokenizer
    with ThreadPoolExecutor(2) as pool:  # the one-process runs beside the 2 ranks (they wait on gloo part of the time)
        done = [pool.submit(launch, root, mode, ranks, WORKER) for mode, ranks in (("fsdp", 2), ("single", 1))]
        for future in done:
            future.result()
    return root


def weights(root, name):
    return torch.load(root / name / "weights.pt")


def info(root, name, rank=0):
    return json.loads((root / name / f"trace{rank}.json").read_text())


def packed(name: str, tensor: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight: packed bytes (their storage dtype differs between the runs), not a number."""
    return "base_layer" in name and tensor.dim() == 2 and tensor.shape[-1] == 1


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a if not packed(n, a[n]))


def bitwise(a: dict, b: dict) -> bool:
    """Equal bit for bit (packed 4-bit bytes stored as floats can read as NaN, so compare their bytes)."""
    return a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


def exports_equal_dirs(sharded, single) -> float:
    """Export both runs' final models beside them and compare the weights."""
    return exports_equal(sharded.parent / f"export-{sharded.name}", str(sharded), str(single))


def exports_equal(tmp_path, sharded: str, single: str) -> float:
    a, b = tmp_path / "sharded", tmp_path / "single"
    export(sharded, str(a), name="m")
    export(single, str(b), name="m")
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    return max_diff(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"))


# ---- growth: copy below, identity inside, random on top, each initialised from the full tensors --------------------


@pytest.mark.slow
def test_fsdp2_growth_equals_one_process_at_every_step(runs):
    """The random stack grown at step 6 is drawn from the full tensors with the run's seed (DTensor's random ops would
    draw per shard: 0.13 off), the copy and identity stacks from the full source blocks."""
    sharded, single = weights(runs, "grow"), weights(runs, "single_grow")
    for rank in (0, 1):
        assert info(runs, "grow", rank)["trace"] == GROW_TRACE == info(runs, "single_grow")["trace"]
    for step, (a, b) in enumerate(zip(sharded["steps"], single["steps"], strict=True)):
        assert max_diff(a, b) <= 1e-6, step  # SGD with momentum: measured 1.1e-8
    # growth really happened: the identity stack's output projections start at zero, the random stack is new
    start = sharded["steps"][5]["model.layers.6.mlp.down_proj.weight"]
    assert not torch.equal(start, sharded["steps"][6]["model.layers.6.mlp.down_proj.weight"])
    run = info(runs, "grow")
    assert run["fsdp"] and run["optimized"] == run["optimized_dtensors"]  # grown blocks are sharded too
    assert run["local_bytes"] * 2 == info(runs, "single_grow")["local_bytes"]


@pytest.mark.slow
def test_fsdp2_growth_resumes_bitwise_inside_a_phase(runs):
    assert info(runs, "grow_resumed")["trace"] == GROW_TRACE[3:]
    assert bitwise(weights(runs, "grow")["final"], weights(runs, "grow_resumed")["final"])


@pytest.mark.slow
def test_fsdp2_growth_exports_like_one_process(runs, tmp_path):
    assert exports_equal(tmp_path / "final", str(runs / "grow"), str(runs / "single_grow")) <= 1e-6
    # a mid-phase checkpoint of a grown rack (stored unarranged): the same model as one process's
    sharded, single = (str(runs / name / "checkpoint-6") for name in ("grow", "single_grow"))
    assert exports_equal(tmp_path / "mid", sharded, single) <= 1e-6


# ---- LoRA: a trunk adapter and per-stack adapters switching on and off, then full training ------------------------


@pytest.mark.slow
def test_fsdp2_lora_adapters_are_sharded_trainable_and_equal_one_process(runs):
    for rank in (0, 1):
        run = info(runs, "dual", rank)
        assert run["trace"] == DUAL_TRACE == info(runs, "single_dual")["trace"]
        # every adapter tensor is in the optimizer from the start and sharded (a DTensor) like the full weights
        assert run["lora"] == run["lora_dtensors"] == info(runs, "single_dual")["lora"] == 84
        assert run["optimized"] == run["optimized_dtensors"]
    sharded, single = weights(runs, "dual"), weights(runs, "single_dual")
    for step, (a, b) in enumerate(zip(sharded["steps"], single["steps"], strict=True)):
        assert max_diff(a, b) <= 1e-6, step  # measured 1.2e-7
    lora_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.stack_1.weight"
    assert sharded["final"][lora_b].abs().max() > 0  # the adapter of phase s1 trained


@pytest.mark.slow
def test_fsdp2_lora_checkpoints_hold_full_tensors_and_resume_bitwise(runs):
    sharded = load_file(runs / "dual" / "checkpoint-3" / "stackwise_trainable.safetensors")
    single = load_file(runs / "single_dual" / "checkpoint-3" / "stackwise_trainable.safetensors")
    assert {n: t.shape for n, t in sharded.items()} == {n: t.shape for n, t in single.items()}
    assert max_diff(sharded, single) <= 1e-6
    assert info(runs, "dual_resumed")["trace"] == DUAL_TRACE[3:]
    assert bitwise(weights(runs, "dual")["final"], weights(runs, "dual_resumed")["final"])


@pytest.mark.slow
def test_fsdp2_lora_merged_export_equals_one_process(runs, tmp_path):
    assert exports_equal(tmp_path / "final", str(runs / "dual"), str(runs / "single_dual")) <= 1e-6
    sharded, single = (str(runs / name / "checkpoint-6") for name in ("dual", "single_dual"))
    assert exports_equal(tmp_path / "mid", sharded, single) <= 1e-6


# ---- 4-bit bases: FSDP-QLoRA, the packed weights stored as float32 so they shard ----------------------------------


@pytest.mark.slow
def test_fsdp2_qlora_shards_the_4bit_base_and_equals_one_process(runs):
    sharded, single = info(runs, "qlora"), info(runs, "single_qlora")
    assert sharded["trace"] == QLORA_TRACE == single["trace"]
    assert len(sharded["weights_4bit"]) == len(single["weights_4bit"]) == 28  # 7 linears x 4 blocks
    for name, (dtype, is_dtensor, local) in sharded["weights_4bit"].items():
        one_dtype, one_dtensor, whole = single["weights_4bit"][name]
        assert (dtype, is_dtensor, one_dtype, one_dtensor) == ("torch.float32", True, "torch.uint8", False)
        assert local * 2 == whole  # the same packed bytes, half on each rank
    assert sharded["lora"] == sharded["lora_dtensors"] == 70
    a, b = weights(runs, "qlora"), weights(runs, "single_qlora")
    for step, (x, y) in enumerate(zip(a["steps"], b["steps"], strict=True)):
        assert max_diff(x, y) <= 1e-6, step  # measured 7.5e-9
    head = "base_model.model.lm_head.weight"  # full precision, trained in phase s0
    assert not torch.equal(a["final"][head], a["steps"][3][head])


@pytest.mark.slow
def test_fsdp2_bf16_qlora_shards_and_equals_one_bf16_process(runs):
    """`bf16: true` with a bf16-compute nf4 base: storage `auto` packs it as bfloat16 under FSDP2, so it shards (one
    process: uint8). Tolerance 3e-4 (measured 1.0e-4 over 8 steps): accelerate's bf16 policy for FSDP2 gathers the
    parameters in bfloat16 (one process keeps float32 weights under autocast, so its norms and additions run in
    float32) and reduces the gradients in bfloat16."""
    sharded, single = info(runs, "qlora_bf16"), info(runs, "single_qlora_bf16")
    assert sharded["trace"] == QLORA_TRACE == single["trace"]
    assert len(sharded["weights_4bit"]) == 28
    for name, (dtype, is_dtensor, local) in sharded["weights_4bit"].items():
        one_dtype, one_dtensor, whole = single["weights_4bit"][name]
        assert (dtype, is_dtensor, one_dtype, one_dtensor) == ("torch.bfloat16", True, "torch.uint8", False)
        assert local * 2 == whole  # the same packed bytes, half on each rank
    assert sharded["lora"] == sharded["lora_dtensors"] == 70
    a, b = weights(runs, "qlora_bf16"), weights(runs, "single_qlora_bf16")
    for step, (x, y) in enumerate(zip(a["steps"], b["steps"], strict=True)):
        assert max_diff(x, y) <= 3e-4, step
    lora_b = "base_model.model.model.layers.3.self_attn.q_proj.lora_B.stack_3.weight"  # phase trunk's top adapter
    assert a["final"][lora_b].abs().max() > 0 and a["final"][lora_b].dtype == torch.float32  # trained, fp32 master


@pytest.mark.slow
def test_fsdp2_qlora_resumes_bitwise_and_exports_like_one_process(runs, tmp_path):
    assert info(runs, "qlora_resumed")["trace"] == QLORA_TRACE[3:]
    assert bitwise(weights(runs, "qlora")["final"], weights(runs, "qlora_resumed")["final"])
    # export re-creates the 4-bit base (float32 storage here, uint8 there), dequantizes it and merges
    assert exports_equal(tmp_path, str(runs / "qlora"), str(runs / "single_qlora")) <= 1e-6
    assert os.path.isfile(runs / "qlora" / "stackwise_trainable.safetensors")


@pytest.mark.slow
def test_fsdp2_grows_an_identity_stack_from_a_4bit_block_like_one_process(runs, tmp_path):
    """LLaMA Pro on a 4-bit base: the new stack copies a 4-bit block, dequantized from its gathered packed bytes with
    the quantization state FSDP2 leaves on the module, then trains in full precision beside the trunk adapter."""
    trace = [[s, [0, 1, 2, 3]] for s in range(4)] + [[s, [0, 1, 2, 3, 4]] for s in range(4, 8)]
    assert info(runs, "qlora_grow")["trace"] == trace == info(runs, "single_qlora_grow")["trace"]
    sharded, single = weights(runs, "qlora_grow"), weights(runs, "single_qlora_grow")
    for step, (a, b) in enumerate(zip(sharded["steps"], single["steps"], strict=True)):
        assert max_diff(a, b) <= 1e-6, step  # measured 7.5e-9
    grown = "base_model.model.model.layers.4.mlp.down_proj.weight"  # full precision, zeroed at growth, then trained
    assert sharded["steps"][4][grown].dtype == torch.float32 and sharded["steps"][4][grown].abs().max() < 1e-2
    assert exports_equal(tmp_path, str(runs / "qlora_grow"), str(runs / "single_qlora_grow")) <= 1e-6


# ---- plan --world-size 2: the shards of adapters and of a 4-bit base, byte for byte against the runs above ---------


def planned(root, tmp_path, pydoc_files, schedule, quantization=None, bf16=False) -> list[dict]:
    recipe = {
        "model": {"name_or_path": str(root / "base"), "dtype": "float32", "quantization": quantization},
        "rack": {"blocks_per_stack": 1},
        "adapters": LORA,
        "data": {"train": {"path": "text", "data_files": pydoc_files[0]}, "max_seq_length": 32},
        "schedule": schedule,
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 8,
            "per_device_train_batch_size": 2,
            "fsdp": True,
            "fsdp_config": {"version": 2},
            **({"bf16": True, "use_cpu": True} if bf16 else {}),  # bf16 on CPU: TrainingArguments wants use_cpu
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(str(path))
    return per_rank(make_plan(recipe), 2, recipe.training)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dual", "qlora", "qlora_bf16"])
def test_plan_predicts_the_shards_of_adapters_and_4bit_bases(runs, tmp_path, pydoc_files, case):
    """Rank 0 of the real run: its parameter shards (LoRA A and B, and the packed 4-bit weights stored as float32, or
    bfloat16 with bf16, each sharded on dim 0), its buffers and the 4-bit quantization state (whole on every rank)
    are `plan`'s FSDP2 weights; the gradient shards before each update are the phase's FSDP2 gradients."""
    from ddp_worker import DUAL

    bf16 = case.endswith("_bf16")
    quantization = None if case == "dual" else {**QUANTIZATION, "compute_dtype": "bfloat16"} if bf16 else QUANTIZATION
    rows = planned(runs, tmp_path, pydoc_files, DUAL if case == "dual" else QLORA, quantization, bf16)
    run = info(runs, case)
    held = run["local_bytes"] + run["buffer_bytes"] + run["quant_state_bytes"]
    assert (run["quant_state_bytes"] > 0) == case.startswith("qlora")
    assert all(row["fsdp2"]["weights"] == held for row in rows)
    steps_per_phase = 8 // len(rows)
    by_phase = [run["grad_bytes"][i * steps_per_phase] for i in range(len(rows))]
    assert all(len(set(run["grad_bytes"][i : i + steps_per_phase])) == 1 for i in range(0, 8, steps_per_phase))
    assert [row["fsdp2"]["gradients"] for row in rows] == by_phase


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grow_adamw", "dual_adamw"])
def test_fsdp2_growth_and_lora_with_adamw_equal_ddp_and_one_process(runs, case):
    """AdamW (no clipping), as test_fsdp.py checks it: bitwise equal to DDP on the same 2 ranks after every step, and
    close to one process. Adam divides each update by the gradient's own magnitude, so the last bits in which 2 ranks
    and 1 process sum a gradient grow into 1e-4 at the first step after growth's `optimizer_state: reset`."""
    trace = GROW_TRACE if case.startswith("grow") else DUAL_TRACE
    for name in (case, f"ddp_{case}", f"single_{case}"):
        assert info(runs, name)["trace"] == trace, name
    sharded, ddp, single = (weights(runs, name) for name in (case, f"ddp_{case}", f"single_{case}"))
    assert all(bitwise(a, b) for a, b in zip(sharded["steps"], ddp["steps"], strict=True))  # measured: bitwise
    assert max_diff(sharded["final"], single["final"]) <= 5e-4  # measured 1.0e-4 (growth), 3.2e-5 (LoRA)
    assert exports_equal_dirs(runs / case, runs / f"ddp_{case}") == 0.0
