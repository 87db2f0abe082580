"""`hf-stackwise export`: a plain model folder with the inactive stacks dropped, loadable in a process that never
imports hf_stackwise or peft, with logits equal to the trained model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from hf_stackwise.cli.commands import main
from hf_stackwise.export.folder import select_blocks
from hf_stackwise.rack.rack import Rack

LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
generated = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
print(json.dumps({"layers": model.config.num_hidden_layers, "blocks": len(model.model.layers),
                  "vocab": len(tok), "generated": generated.shape[1],
                  "clean": "hf_stackwise" not in sys.modules and "peft" not in sys.modules}))
"""


def load_elsewhere(folder, ids, tmp_path):
    out = tmp_path / "logits.pt"
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder), json.dumps(ids.tolist()), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(out)


def train_run(tmp_path, model_dir, train_file, last_stacks):
    raw = {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "data": {"train": {"path": "text", "data_files": train_file}, "max_seq_length": 32},
        "schedule": [
            {"name": "full", "until": 0.5, "train": "all"},
            {"name": "shallow", "until": 1.0, "stacks": last_stacks, "train": "all"},
        ],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "report_to": "none",
            "use_cpu": True,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    return tmp_path / "run"


def test_export_drops_inactive_stacks_and_matches_logits(tmp_path, tiny_llama_dir, pydoc_files, token_dataset):
    run = train_run(tmp_path, tiny_llama_dir, pydoc_files[0], last_stacks=2)
    ids = torch.tensor(token_dataset[:2]["input_ids"])
    trained = AutoModelForCausalLM.from_pretrained(run)
    with Rack.from_model(trained).active_depth(2), torch.no_grad():
        expected = trained(input_ids=ids).logits
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    info, logits = load_elsewhere(tmp_path / "exported", ids, tmp_path)
    assert info == {"layers": 2, "blocks": 2, "vocab": 512, "generated": 8, "clean": True}
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    # a checkpoint from the full-depth phase exports every block
    assert main(["export", str(run / "checkpoint-2"), str(tmp_path / "early")]) == 0
    info, _ = load_elsewhere(tmp_path / "early", ids, tmp_path)
    assert info["layers"] == 4 and info["clean"]


def test_export_refuses_bad_sources_and_non_empty_targets(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "out")]) == 2
    assert "is not an hf_stackwise run or checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_without_the_flag(tmp_path, tiny_llama_dir, pydoc_files, capsys):
    run = train_run(tmp_path, tiny_llama_dir, pydoc_files[0], last_stacks=4)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["export", str(run), str(target)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert os.listdir(target) == ["keep.txt"]
    assert main(["export", str(run), str(target), "--overwrite"]) == 0
    assert "keep.txt" not in os.listdir(target) and "model.safetensors" in os.listdir(target)


def test_per_layer_config_lists_stay_consistent(tmp_path):
    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    model = AutoModelForCausalLM.from_config(config)
    select_blocks(model, "model.layers", [0, 1, 2])
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 2, 3, 4]])
    out = reloaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
