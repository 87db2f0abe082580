"""FSDP2 through the Trainer with 2 real CPU ranks (torchrun, gloo; the FSDP plugin forced, see fsdp_worker.py):
transitions that freeze and unfreeze stacks give one process's result (SGD), DDP's (AdamW), keep frozen blocks
bit-identical, optimize sharded parameters only, run in bf16, resume bitwise and export like one process. And the
refusals of sharded setups that would be silently wrong, each naming the key and the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_stackwise.distributed.sharding import (
    arranged_state_dict,
    check_sharding,
    check_torch_version,
    storage_settings,
)
from hf_stackwise.errors import RecipeError
from hf_stackwise.export.folder import export
from hf_stackwise.schedule.phases import Schedule

HERE = os.path.dirname(os.path.abspath(__file__))
CONNECTION_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Address already in use")
GOLDEN = [[0, [3]], [1, [3]], [2, [0, 1]], [3, [0, 1]], [4, [1]], [5, [1]], [6, [0, 1, 2, 3]], [7, [0, 1, 2, 3]]]


def launch(root, mode: str, ranks: int, worker: str = "fsdp_worker.py") -> None:
    """Run ``worker``; retried once only when gloo fails to connect at start-up, or when the processes abort at exit
    after every result was written (the `.done` marker)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd += [worker, str(root), mode]
    before = set(os.listdir(root))
    for attempt in (1, 2):
        for name in set(os.listdir(root)) - before:  # a retry starts from what the failed attempt found
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        result = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            return
        done = os.path.isfile(os.path.join(root, f"{mode}.done"))
        started = "Traceback" in result.stderr and not done
        retry = any(e in result.stderr for e in CONNECTION_ERRORS) and not started or done
        if attempt == 2 or not retry:
            break
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    raise AssertionError("\n".join(errors[:30]) + "\n...\n" + result.stderr[-3000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for mode, ranks in (("fsdp", 2), ("single", 1)):
        launch(root, mode, ranks)
    return root


def weights(root, name):
    return torch.load(root / name / "weights.pt")


def info(root, name, rank=0):
    return json.loads((root / name / f"trace{rank}.json").read_text())


def max_diff(a: dict, b: dict) -> float:
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


@pytest.mark.slow
def test_fsdp2_runs_the_schedule_on_sharded_parameters(runs):
    for name in ("adamw", "sgd", "bf16"):
        for rank in (0, 1):
            run = info(runs, name, rank)
            assert run["fsdp"] and run["world_size"] == 2 and run["trace"] == GOLDEN
            # every optimized parameter is a DTensor shard: the superset (39 tensors), about half of it on each rank
            assert run["optimized"] == run["optimized_dtensors"] == 39
    total = sum(t.numel() for t in weights(runs, "single_sgd")["final"].values())
    assert sum(info(runs, "adamw", r)["local_numel"] for r in (0, 1)) == total
    ddp = info(runs, "ddp")  # the reference: real DDP in the same process group, after the FSDP2 runs
    assert ddp["wrapped"] == "DistributedDataParallel" and ddp["optimized_dtensors"] == 0 and ddp["trace"] == GOLDEN
    assert info(runs, "adamw")["wrapped"].startswith("FSDP")


@pytest.mark.slow
def test_fsdp2_sgd_matches_one_process_and_adamw_matches_ddp(runs):
    sgd, single = weights(runs, "sgd")["final"], weights(runs, "single_sgd")["final"]
    assert max_diff(sgd, single) <= 1e-5  # measured 1.1e-8 (SGD with momentum 0.9)
    adamw, ddp = weights(runs, "adamw")["final"], weights(runs, "ddp")["final"]
    assert adamw.keys() == ddp.keys()
    assert all(torch.equal(adamw[n], ddp[n]) for n in ddp), max_diff(adamw, ddp)  # bitwise equal to DDP
    start = weights(runs, "single_sgd")["steps"][0]
    assert not torch.equal(adamw["model.layers.2.mlp.up_proj.weight"], start["model.layers.2.mlp.up_proj.weight"])


@pytest.mark.slow
def test_fsdp2_autofreeze_decides_alike_on_every_rank_and_matches_one_process(runs):
    """Gradient statistics from the shards, summed over the ranks: both ranks take the one-process decisions, and the
    frozen stack stays bit-identical from its freeze step under FSDP2."""
    ranks = [info(runs, "autofreeze", r) for r in (0, 1)]
    alone = info(runs, "single_autofreeze")
    assert ranks[0]["fsdp"] and ranks[0]["freeze_decisions"], "no stack froze"
    assert ranks[0]["freeze_decisions"] == ranks[1]["freeze_decisions"]
    assert [(d["step"], d["stacks"]) for d in ranks[0]["freeze_decisions"]] == [
        (d["step"], d["stacks"]) for d in alone["freeze_decisions"]
    ]
    assert ranks[0]["trace"] == ranks[1]["trace"] == alone["trace"]
    sharded, single = weights(runs, "autofreeze"), weights(runs, "single_autofreeze")
    assert max_diff(sharded["final"], single["final"]) <= 1e-5  # as the SGD case above
    first = ranks[0]["freeze_decisions"][0]
    for stack in first["stacks"]:
        for name, value in sharded["final"].items():
            if name.startswith(f"model.layers.{stack}."):  # steps[k]: the weights after step k (0-based)
                assert torch.equal(value, sharded["steps"][first["step"] - 1][name]), name


@pytest.mark.slow
def test_fsdp2_evaluations_between_steps_change_nothing(runs):
    """`eval_on_start` and evaluations every 3 steps leave the root and head unsharded after their forward (one
    right before the transition at step 6, which reshards before flipping `requires_grad`): the run is bitwise the
    one without evaluations."""
    evals, plain = weights(runs, "evals")["final"], weights(runs, "adamw")["final"]
    assert info(runs, "evals")["trace"] == GOLDEN
    assert all(torch.equal(evals[n], plain[n]) for n in plain)


@pytest.mark.slow
def test_fsdp2_frozen_blocks_are_bit_identical_in_their_frozen_phases(runs):
    for name in ("adamw", "sgd", "bf16"):
        steps = weights(runs, name)["steps"]
        checked = 0
        for step, blocks in GOLDEN[1:]:
            for tensor in steps[step]:
                if tensor.startswith("model.layers.") and int(tensor.split(".")[2]) not in blocks:
                    assert torch.equal(steps[step][tensor], steps[step - 1][tensor]), (name, step, tensor)
                    checked += 1
        assert checked > 100


@pytest.mark.slow
def test_fsdp2_bf16_transitions_complete(runs):
    """A bf16 MixedPrecisionPolicy: blocks frozen at FSDP2's first forward train later (the dtype refresh; without
    it the first unfrozen block's backward raises a grad_dtype error); fp32 master weights stay close to fp32."""
    bf16, fp32 = weights(runs, "bf16")["final"], weights(runs, "adamw")["final"]
    assert all(t.dtype == torch.float32 for t in bf16.values())  # the superset was upcast at prepare
    assert max_diff(bf16, fp32) < 2e-2  # measured 5.3e-3
    start = weights(runs, "bf16")["steps"][0]
    assert not torch.equal(bf16["model.layers.2.mlp.up_proj.weight"], start["model.layers.2.mlp.up_proj.weight"])


@pytest.mark.slow
def test_fsdp2_resume_from_a_mid_phase_checkpoint_is_bitwise(runs):
    full, resumed = weights(runs, "adamw"), weights(runs, "resumed")
    assert info(runs, "resumed")["trace"] == GOLDEN[3:]  # resumed inside phase `bottom` (steps 2..3)
    for name in full["final"]:
        assert torch.equal(full["final"][name], resumed["final"][name]), name


@pytest.mark.slow
def test_fsdp2_checkpoint_exports_like_one_process(runs, tmp_path):
    sharded = export(str(runs / "adamw" / "checkpoint-8"), str(tmp_path / "a"), name="m")
    single = export(str(runs / "single_adamw" / "checkpoint-8"), str(tmp_path / "b"), name="m")
    assert sharded.endswith("checkpoint-8") and single.endswith("checkpoint-8")
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in "ab"]
    assert config[0] == config[1]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys()
    assert max_diff(a, b) <= 1e-4  # 2 ranks vs 1 (AdamW), measured 7.5e-6


@pytest.mark.slow
def test_fsdp2_final_model_exports_like_one_process(runs, tmp_path):
    """The end of an FSDP2 run saves the plain model gathered on rank 0: the run folder loads and exports as a
    one-process run's does, and holds the trained weights exactly."""
    final = load_file(runs / "adamw" / "model.safetensors")
    trained = weights(runs, "adamw")["final"]
    assert final.keys() == trained.keys()
    assert all(torch.equal(final[n], trained[n]) for n in final)
    export(str(runs / "adamw"), str(tmp_path / "a"), name="m")
    export(str(runs / "single_adamw"), str(tmp_path / "b"), name="m")
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and max_diff(a, b) <= 1e-4


# ---- refusals: each names the key and the reason, from the recipe and the rack only ------------------------------

CHANGING = Schedule.from_list(
    [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "bottom", "until": 1.0, "train": [0]}]
)
FIXED = Schedule.from_list([{"name": "all", "until": 1.0, "train": "all"}])
FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2}}


def refusal(training, schedule=CHANGING, env=None, **kwargs) -> str:
    with pytest.raises(RecipeError) as error:
        check_sharding(training, schedule, (1, 1, 1, 1), env={} if env is None else env, **kwargs)
    return str(error.value)


def test_deepspeed_and_fsdp1_are_refused_with_the_measured_reason():
    message = refusal({"deepspeed": "ds.json"})
    assert message.startswith("training.deepspeed: the schedule changes which parameters train")
    assert "1.4e-2 off" in message and "fsdp2.yaml" in message
    message = refusal({}, env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert "accelerate config (distributed_type: DEEPSPEED)" in message and "1.4e-2" in message
    message = refusal({"fsdp": True, "fsdp_config": {"version": 1}})
    assert message.startswith("training.fsdp: the schedule changes") and "FSDP1" in message
    message = refusal({}, env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert "distributed_type: FSDP" in message and "FSDP1" in message
    # a fixed trainable set: correct in principle, but unverified (nothing here runs them)
    assert "never changes here" in refusal({"deepspeed": "ds.json"}, FIXED)
    assert "never changes here" in refusal({"fsdp": True, "fsdp_config": {"version": 1}}, FIXED)


def test_fsdp2_settings_that_do_not_work_are_refused():
    message = refusal({"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_foward": True}})
    assert message.startswith("training.fsdp_config.reshard_after_foward: not an FSDP setting")
    assert refusal({"fsdp": True, "fsdp_config": {"version": "two"}}).startswith("training.fsdp_config.version: 'two'")
    message = refusal({"fsdp": True, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}})
    assert message.startswith("training.fsdp_config.state_dict_type: SHARDED_STATE_DICT")
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # accelerate's FSDP2 default is sharded
    assert refusal({}, env=env).startswith("fsdp_state_dict_type: SHARDED_STATE_DICT")
    assert "use `bf16: true`" in refusal({**FSDP2, "fp16": True})
    # a bf16 policy casts a float32 (or float16) storage of packed 4-bit weights; measured on 2 ranks, it raises
    message = refusal({**FSDP2, "bf16": True}, FIXED, quantized={"bits": 4, "quant_storage": "float32"})
    assert message.startswith("model.quantization.quant_storage: float32 with bf16 under training.fsdp (FSDP2)")
    assert "quant_storage: bfloat16" in message and "invalid for input of size" in message
    # LoRA, growth and 4-bit bases run under FSDP2 (test_fsdp_adapters.py)
    lora = Schedule.from_list([{"name": "a", "until": 1.0, "train": [0], "adapter": "lora"}])
    assert check_sharding(FSDP2, lora, (1, 1, 1, 1), env={}) == "fsdp2"
    grow = Schedule.from_list(
        [{"name": "a", "until": 0.5, "train": "all"}, {"name": "b", "until": 1.0, "grow": {"op": "copy", "stacks": 1}}]
    )
    assert check_sharding(FSDP2, grow, (1, 1, 1, 1), env={}) == "fsdp2"
    for storage in ("auto", "bfloat16", "uint8"):
        quantized = {"bits": 4, "quant_storage": storage}
        assert check_sharding({**FSDP2, "bf16": True}, lora, (1, 1, 1, 1), quantized, env={}) == "fsdp2"
    assert check_sharding(FSDP2, lora, (1, 1, 1, 1), {"bits": 4, "quant_storage": "float32"}, env={}) == "fsdp2"
    # what works is accepted: FSDP2, fp32 or bf16, the accelerate config of recipes/accelerate/fsdp2.yaml
    assert check_sharding(FSDP2, CHANGING, (1, 1, 1, 1), env={}) == "fsdp2"
    assert check_sharding({**FSDP2, "bf16": True}, CHANGING, (1, 1, 1, 1), env={}) == "fsdp2"
    env = {**env, "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert check_sharding({}, CHANGING, (1, 1, 1, 1), env=env) == "fsdp2"
    assert check_sharding({}, CHANGING, (1, 1, 1, 1), env={}) is None


def test_fsdp2_bf16_needs_the_verified_torch_version():
    check_torch_version("2.13.0+cpu")
    with pytest.raises(RecipeError, match=r"training.bf16 with training.fsdp \(FSDP2\): torch 2.12.1 is installed"):
        check_torch_version("2.12.1")


BAD = {  # training section → what the one-paragraph refusal names
    "deepspeed": ({"deepspeed": "ds.json"}, "training.deepspeed: the schedule changes which parameters train"),
    "fsdp1": ({"fsdp": True, "fsdp_config": {"version": 1}}, "training.fsdp: the schedule changes which"),
    "key": ({"fsdp": True, "fsdp_config": {"verison": 2}}, "training.fsdp_config.verison: not an FSDP setting"),
    "sharded": (
        {"fsdp": True, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}},
        "training.fsdp_config.state_dict_type: SHARDED_STATE_DICT saves no model file",
    ),
    "fp16": ({"fsdp": True, "fp16": True}, "training.fp16 with training.fsdp (FSDP2)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_sharding_before_any_weight_loads(
    tmp_path, tiny_llama_dir, pydoc_files, capsys, monkeypatch, case
):
    from conftest import tiny_recipe, write_recipe
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.cli.commands import main

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was refused")

    monkeypatch.setattr(run, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    schedule = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule)
    training, expected = BAD[case]
    raw["training"].update(training)
    assert main(["train", write_recipe(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-stackwise: error: ") and err.count("\n") == 1 and expected in err, err
    assert not os.path.exists(raw["training"]["output_dir"])


def test_a_gathered_state_dict_is_saved_as_the_producing_phase_runs():
    """The final save of an FSDP2 run whose last phase runs blocks [3, 0] renames them 0, 1 and drops the rest."""
    full = {"model.embed_tokens.weight": 0, **{f"model.layers.{b}.w": b for b in range(4)}, "lm_head.weight": 9}
    arranged = arranged_state_dict(full, "model.layers", [3, 0])
    assert arranged == {
        "model.embed_tokens.weight": 0,
        "model.layers.0.w": 3,
        "model.layers.1.w": 0,
        "lm_head.weight": 9,
    }


def test_4bit_storage_is_the_dtype_fsdp2_gathers_in():
    """`quant_storage: auto` packs 4-bit weights in uint8 without FSDP2 (bitsandbytes' default) and in the dtype
    FSDP2 gathers parameters in under it, so they shard (accelerate keeps uint8 ones whole on every rank)."""
    from hf_stackwise.rack.quantization import bnb_config, quant_storage

    assert quant_storage({}) == quant_storage({}, {"bf16": True}) == "uint8"
    assert quant_storage({}, {"fsdp": True}) == "float32"
    assert quant_storage({"quant_storage": "auto"}, {"fsdp": True, "bf16": True}) == "bfloat16"
    assert quant_storage({"quant_storage": "uint8"}, {"fsdp": True}) == "uint8"
    assert bnb_config({}, ["lm_head"], {"fsdp": True}).bnb_4bit_quant_storage == torch.float32
    assert bnb_config({}, ["lm_head"]).bnb_4bit_quant_storage == torch.uint8
    # `hf-stackwise train` reads FSDP2 and bf16 from the recipe or from the accelerate launch (recipes/accelerate/)
    launched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert quant_storage({}, storage_settings({}, env=launched)) == "bfloat16"
    assert quant_storage({}, storage_settings({"fsdp": True, "fsdp_config": {"version": 2}}, env={})) == "float32"
    assert quant_storage({}, storage_settings({"fsdp": True, "fsdp_config": {"version": 1}}, env={})) == "uint8"
    assert quant_storage({}, storage_settings({}, env={})) == "uint8"


def test_a_4bit_storage_dtype_outside_the_list_names_the_key():
    from hf_stackwise.recipe.loader import validate_recipe

    raw = {
        "model": {"name_or_path": "x", "quantization": {"bits": 4, "quant_storage": "int4"}},
        "data": {"train": {"path": "text", "data_files": "a.txt"}},
        "schedule": [{"name": "a", "until": 1.0, "train": [0], "adapter": "lora"}],
        "training": {"output_dir": "out", "max_steps": 2},
    }
    with pytest.raises(RecipeError, match=r"model.quantization.quant_storage: 'int4' is not auto, uint8"):
        validate_recipe(raw)
    raw["model"]["quantization"]["quant_storage"] = "bfloat16"
    assert validate_recipe(raw).model["quantization"]["quant_storage"] == "bfloat16"
