"""`data.task: sft`: chat / instruction fine-tuning through TRL's SFTTrainer, from a recipe. Labels on the
assistant turns only (also with SmolLM2's real template, which has no generation markers), packing, per-phase
truncation, mixtures, exact resume, export with the chat template, the shipped recipes, and bad input."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil

import pytest
import torch
import yaml
from conftest import brief_run_args, tiny_causal_lm, tiny_config, write_recipe

pytest.importorskip("trl")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_stackwise.cli import pipeline as run  # noqa: E402
from hf_stackwise.cli.commands import main  # noqa: E402
from hf_stackwise.data.sft import truncate_for_phase  # noqa: E402
from hf_stackwise.recipe.loader import validate_recipe  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
# A short template for the tiny test tokenizer (conftest's has none): every turn ends with <eos>.
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SYSTEM = "Answer from the Python documentation."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What does `abs` do?"},
    {"role": "assistant", "content": "Return the absolute value of the argument."},
    {"role": "user", "content": "And `len`?"},
    {"role": "assistant", "content": "Return the number of items in a container."},
]
SINGLE = [
    {"role": "user", "content": "What does `max` do?"},
    {"role": "assistant", "content": "With a single iterable argument, return its biggest item."},
]


def conversations(count: int, offset: int = 0) -> list[dict]:
    """Short real conversations from Python's docs (the SFT asset's pairs, answers cut), some multi-turn."""
    from demo_assets import chat_pairs

    pairs = chat_pairs()[offset:]
    rows = []
    for i in range(count):
        question, answer = pairs[i]
        messages = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer[:120]}]
        if i % 5 == 4:  # a second turn
            question, answer = pairs[i + count]
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer[:80]}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    train = write_jsonl(folder / "train.jsonl", conversations(64))
    evaluation = write_jsonl(folder / "eval.jsonl", conversations(8, offset=200))
    template = folder / "template.jinja"
    template.write_text(TEMPLATE)
    return train, evaluation, str(template)


def sft_recipe(tmp_path, model_dir, chat_files, schedule=None, **data) -> dict:
    train, evaluation, template = chat_files
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "rack": {"blocks_per_stack": 1},
        "data": {
            "task": "sft",
            "train": {"path": "json", "data_files": train},
            "eval": {"path": "json", "data_files": evaluation},
            "chat_template": template,
            "max_seq_length": 128,
            **data,
        },
        "schedule": schedule or [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0}],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
            "logging_steps": 1,
        },
    }


def trainer_for(raw: dict, model=None):
    prepared = run.prepare(validate_recipe(raw))
    return run.build_trainer(prepared, model=model)


def labelled(row) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]


# ---- labels -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer and chat template (no generation markers) with a tiny config."""
    if not SMOLLM2.exists():
        pytest.skip("run `make assets` first")
    folder = tmp_path_factory.mktemp("smol-tiny")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), tokenizer


def test_labels_are_the_assistant_turns_with_smollm2s_template(tmp_path, smollm2_dir):
    folder, tokenizer = smollm2_dir
    assert "{% generation" not in tokenizer.chat_template  # TRL's assistant_only_loss could not mask it
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": SINGLE}])
    raw = sft_recipe(tmp_path, folder, (data, data, None))
    del raw["data"]["chat_template"]
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(tokenizer)))
    trainer = trainer_for(raw, model)
    rows = list(trainer.train_dataset)
    answers = [CONVERSATION[2]["content"], CONVERSATION[4]["content"], SINGLE[1]["content"]]
    assert len(rows) == 3  # one row per assistant turn, in order
    for row, answer in zip(rows, answers):
        marks = [label != -100 for label in row["labels"]]
        first = marks.index(True)
        assert all(marks[first:]) and not any(marks[:first])  # the answer is the labelled suffix
        assert tokenizer.decode(labelled(row)) == answer + "<|im_end|>\n"  # the end of turn is trained too
    context = tokenizer.decode(rows[1]["input_ids"])  # the second turn sees the whole first exchange
    assert context == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(rows[2]["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI")

    raw["data"]["loss_on"] = "all"
    trainer = trainer_for(raw, AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(tokenizer))))
    rows = list(trainer.train_dataset)
    assert [tokenizer.decode(r["input_ids"]) for r in rows] == [
        tokenizer.apply_chat_template(c, tokenize=False) for c in (CONVERSATION, SINGLE)
    ]
    batch = trainer.data_collator(rows)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])  # every token but padding
    assert (batch["labels"][~real] == -100).all() and (~real).any()


def test_prompt_completion_rows_label_the_completion(tmp_path, tiny_llama_dir, chat_files):
    rows = [
        {"prompt": [{"role": "user", "content": "What does `abs` do?"}], "completion": [SINGLE[1]]},
        {"prompt": "Question: what does `len` do? Answer:", "completion": " The number of items."},
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for row in rows:
        data = write_jsonl(tmp_path / "pc.jsonl", [row] * 4)
        raw = sft_recipe(tmp_path, tiny_llama_dir, (data, data, chat_files[2]))
        first = next(iter(trainer_for(raw, tiny_causal_lm("llama")).train_dataset))
        completion = row["completion"][0]["content"] + "<eos>" if isinstance(row["completion"], list) else None
        assert tokenizer.decode(labelled(first)) == (completion or row["completion"] + "<eos>")


# ---- packing, per-phase lengths ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_keeps_the_labelled_tokens_and_isolates_examples(tmp_path, tiny_llama_dir, chat_files, attention):
    raw = sft_recipe(tmp_path, tiny_llama_dir, chat_files, max_seq_length=256)
    plain = list(trainer_for(raw, tiny_causal_lm("llama")).train_dataset)
    raw["data"]["packing"] = True
    config = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    trainer = trainer_for(raw, model)
    packed = list(trainer.train_dataset)
    assert len(packed) < len(plain)
    segments = []
    for row in packed:
        start = 0
        for length in row["seq_lengths"]:
            piece = {k: row[k][start : start + length] for k in ("input_ids", "labels")}
            segments.append(tuple(labelled(piece)))
            start += length
    assert sorted(segments) == sorted(tuple(labelled(r)) for r in plain)
    assert trainer.packing_isolated  # position ids restart: transformers' mask keeps the examples apart
    batch = trainer.data_collator(packed[:2])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    trainer.train()  # the data plane leaves packed (padding-free) batches alone
    assert trainer.state.global_step == 4


def test_a_shorter_phase_truncates_conversations(tmp_path, tiny_llama_dir, chat_files):
    schedule = [
        {"name": "short", "until": 0.5, "train": ["top"], "max_seq_length": 24},
        {"name": "long", "until": 1.0},
    ]
    trainer = trainer_for(sft_recipe(tmp_path, tiny_llama_dir, chat_files, schedule), tiny_causal_lm("llama"))
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(4))))
    assert batch["input_ids"].shape[1] > 24
    trainer._resolve(4)
    short, long = trainer._transform_inputs(batch, 0), trainer._transform_inputs(batch, 2)
    assert short["input_ids"].shape[1] == 24 and torch.equal(short["labels"], batch["labels"][:, :24])
    assert long is batch
    assert truncate_for_phase(batch, 24, 24) is batch
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["max_seq_length"] for h in logs] == [24, 24, 128, 128]


# ---- schedule features: unfreezing + LoRA, resume, export, mixtures --------------------------------------


SCHEDULE = [
    {"name": "top", "until": 0.34, "train": ["top"]},
    {"name": "s1-lora", "until": 0.67, "train": [1], "adapter": "lora", "max_seq_length": 64},
    {"name": "all", "until": 1.0, "train": "all"},
]


def test_resume_mid_phase_is_bitwise_equal_and_export_keeps_the_template(tmp_path, tiny_llama_dir, chat_files):
    raw = sft_recipe(tmp_path, tiny_llama_dir, chat_files, SCHEDULE)
    raw["adapters"] = {"r": 4, "alpha": 8}
    raw["training"].update(max_steps=6, save_steps=1, save_strategy="steps", logging_steps=1)
    path = write_recipe(tmp_path, raw)
    assert main(["train", path]) == 0
    full = tmp_path / "run"
    state = json.loads((full / "trainer_state.json").read_text())
    assert [h["phase"] for h in state["log_history"] if "loss" in h] == ["top"] * 2 + ["s1-lora"] * 2 + ["all"] * 2
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")  # inside phase s1-lora (steps 2-3)
    shutil.copy(full / "stackwise_run.json", resumed / "stackwise_run.json")
    argv = ["train", path, "--training.output_dir", str(resumed), "--training.resume_from_checkpoint", "true"]
    assert main(argv) == 0
    files = [f for f in os.listdir(full) if f.endswith(".safetensors")]
    assert "stackwise_trainable.safetensors" in files
    for name in files:
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    assert main(["export", str(full), str(tmp_path / "export")]) == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert exported.chat_template == TEMPLATE  # data.chat_template travels with the model
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.num_hidden_layers == 4


def test_mixture_of_chat_datasets(tmp_path, tiny_llama_dir, chat_files):
    first = write_jsonl(tmp_path / "a.jsonl", conversations(24))
    second = write_jsonl(tmp_path / "b.jsonl", conversations(24, offset=100))
    raw = sft_recipe(tmp_path, tiny_llama_dir, chat_files, loss_on="completion")
    del raw["data"]["train"], raw["data"]["eval"]
    raw["data"]["datasets"] = {
        "topics": {"path": "json", "data_files": first},
        "funcs": {"path": "json", "data_files": second},
    }
    raw["data"]["eval_fraction"] = 0.25
    raw["schedule"] = [
        {"name": "topics", "until": 0.5, "train": ["top"], "data": {"topics": 1.0, "funcs": 0.0}},
        {"name": "both", "until": 1.0, "data": {"topics": 0.5, "funcs": 0.5}},
    ]
    trainer = trainer_for(raw, tiny_causal_lm("llama"))
    mixture = trainer.train_dataset
    assert all("input_ids" in s.column_names and "labels" in s.column_names for s in mixture.sources.values())
    assert all(mixture.source_of(i) == "topics" for i in range(8))  # phase 1 reads only `topics`
    sample = mixture[0]
    assert set(sample) >= {"input_ids", "labels"} and any(label != -100 for label in sample["labels"])
    trainer.train()
    assert trainer.state.global_step == 4
    assert trainer.evaluate()["eval_loss"] > 0

    bad = copy.deepcopy(raw)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain prose"}) + "\n")
    bad["data"]["datasets"]["prose"] = {"path": "json", "data_files": str(text)}
    with pytest.raises(run.RecipeError, match=r"data.datasets.prose: no `messages` column"):
        run.prepare(validate_recipe(bad))


@pytest.mark.parametrize("name", ["sft_unfreeze", pytest.param("llama_pro_sft", marks=pytest.mark.slow)])
def test_shipped_sft_recipes_run_briefly(tmp_path, tiny_30_block_dir, chat_files, name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their data relative to the project root (made by `make assets`)
    extra = ("--data.chat_template", chat_files[2], "--data.max_seq_length", "160", "--data.max_eval_samples", "4")
    argv = brief_run_args(f"recipes/smollm2-135m/{name}.yaml", tiny_30_block_dir, tmp_path, *extra)
    assert main(argv) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == TEMPLATE
    layers = AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.num_hidden_layers
    assert layers == (35 if name == "llama_pro_sft" else 30)  # LLaMA Pro: 5 identity blocks interleaved


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-bert")
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_config(tiny_config("bert")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def bad_cases(tmp_path, chat_files, bert_dir):
    def data(name, rows):
        return {"train": {"path": "json", "data_files": write_jsonl(tmp_path / f"{name}.jsonl", rows)}}

    user = {"role": "user", "content": "Hi?"}
    answer = {"role": "assistant", "content": "Hello."}
    return [
        (data("qa", [{"question": "q", "answer": "a"}]), "data.train: no `messages` column"),
        (data("p", [{"prompt": "q"}]), "data.train: no `completion` column"),
        (data("c", [{"completion": "a"}]), "data.train: no `prompt` column"),
        (data("norole", [{"messages": [{"content": "Hi?"}, answer]}]), "messages[0]: the message has no `role`"),
        (
            data("nocontent", [{"messages": [user, {"role": "assistant"}]}]),
            "messages[1]: the message has no `content`",
        ),
        (
            data("order", [{"messages": [user, user, answer]}]),
            "messages[1].role: 'user' where the chat template needs",
        ),
        ({"chat_template": None}, "data.chat_template: the tokenizer of"),
        ({"model": bert_dir}, "data.task: `sft` fine-tunes a causal LM"),
        ({"loss_on": "answers"}, "data.loss_on: 'answers' is not one of"),
        ({"packing": True, "phase_length": 32}, "schedule[0].max_seq_length: packed rows are cut"),
        ({"phase_task": "clm"}, "schedule[0].task: 'clm' in an `sft` run"),
    ]


def test_bad_sft_input_is_refused_before_weights_load(
    tmp_path, tiny_llama_dir, chat_files, bert_dir, capsys, monkeypatch
):
    monkeypatch.setattr(run, "load_model", lambda prepared: pytest.fail("weights loaded"))
    for index, (change, expected) in enumerate(bad_cases(tmp_path, chat_files, bert_dir)):
        raw = sft_recipe(tmp_path, change.pop("model", tiny_llama_dir), chat_files)
        raw["training"]["output_dir"] = str(tmp_path / f"run{index}")
        if "phase_length" in change:
            raw["schedule"][0]["max_seq_length"] = change.pop("phase_length")
        if "phase_task" in change:
            raw["schedule"][0]["task"] = change.pop("phase_task")
        if "chat_template" in change:
            del raw["data"]["chat_template"]
            change.pop("chat_template")
        raw["data"].update(change)
        assert main(["train", write_recipe(tmp_path, raw)]) == 2, expected
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (after datasets' progress bars)
        assert expected in last and last.startswith("hf-stackwise: error: ") and "Traceback" not in err, err
        assert not (tmp_path / f"run{index}").exists()


def test_a_template_that_refuses_the_roles_is_caught_before_weights(tmp_path, tiny_llama_dir, chat_files):
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + TEMPLATE
    )
    raw = sft_recipe(tmp_path, tiny_llama_dir, chat_files)
    raw["data"]["chat_template"] = str(strict)
    with pytest.raises(
        run.RecipeError, match=r"data.train row 0: the chat template refuses this conversation: no system"
    ):
        run.prepare(validate_recipe(raw))
    raw["data"]["chat_template"] = str(tmp_path / "missing.jinja")
    with pytest.raises(run.RecipeError, match=r"data.chat_template: '.*missing.jinja' is neither a file"):
        run.prepare(validate_recipe(raw))


# ---- DDP ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_sft_equals_one_process(tmp_path, tiny_llama_dir, chat_files):
    from test_ddp import torchrun

    raw = sft_recipe(tmp_path, tiny_llama_dir, chat_files, SCHEDULE[:1] + [{"name": "all", "until": 1.0}])
    raw["training"].update(per_device_train_batch_size=2)
    del raw["training"]["output_dir"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    torchrun("-m", "hf_stackwise", "train", str(path), "--training.output_dir", str(tmp_path / "ddp"), cwd=tmp_path)
    argv = ["train", str(path), "--training.output_dir", str(tmp_path / "one")]
    assert main(argv + ["--training.per_device_train_batch_size", "4"]) == 0
    two, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    start = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
