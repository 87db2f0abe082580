"""The activation cache is exact or off with a reason: one test per class of defect that made a cached run silently
differ from the uncached one (a stochastic or hooked prefix, outputs read from the prefix, a store bound to the
wrong run, a damaged store, rows of unknown length, padding that changes a row's inputs), and no spurious log."""

from __future__ import annotations

import os
import random
import re
import shutil

import pytest
import torch
from conftest import VOCAB, pydoc_paragraphs, tiny_arguments, tiny_causal_lm, tiny_config
from test_cache import TOP, assert_same_training, rows
from transformers import TrainerCallback

from hf_stackwise.errors import StackwiseError
from hf_stackwise.trainer import StackwiseTrainer


def train(tmp_path, name, dataset, model=None, cache=None, resume=None, callbacks=(), collator=None, **overrides):
    """Train a tiny model (a 4-block Llama unless given) on ``dataset``; returns (trainer, losses)."""
    kwargs = dict(max_steps=12, logging_steps=1, schedule=TOP, activation_cache=cache)
    kwargs.update(overrides)
    trainer = StackwiseTrainer(
        model=model if model is not None else tiny_causal_lm("llama", layers=4),
        args=tiny_arguments(tmp_path / name, **kwargs),
        train_dataset=dataset,
        data_collator=collator,
    )
    for callback in callbacks:
        callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---- a prefix whose output differs between visits, or whose outputs the loss reads -------------------------------


def noisy_hook(module, args, output):
    return output + 0.01 * torch.randn_like(output)


def moe(**config):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    base.update(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    return MixtralForCausalLM(MixtralConfig(**base, **config))


def with_dropout_module():
    """A dropout module inside block 1's MLP: no config key names it."""
    model = tiny_causal_lm("llama", layers=4)
    mlp = model.model.layers[1].mlp
    mlp.down_proj = torch.nn.Sequential(mlp.down_proj, torch.nn.Dropout(0.1))
    return model


def with_hook(where):
    model = tiny_causal_lm("llama", layers=4)
    module = model.model.embed_tokens if where == "embeddings" else model.model.layers[2]
    module.register_forward_hook(noisy_hook)
    return model


HAZARDS = {
    "neftune": (None, {"neftune_noise_alpha": 5.0}, "training.neftune_noise_alpha: the noise changes the embeddings"),
    "dropout-module": (with_dropout_module, {}, "model.model.layers.1.mlp.down_proj.1: Dropout(p=0.1) is random"),
    "embedding-hook": (lambda: with_hook("embeddings"), {}, "model.model.embed_tokens: a forward hook (noisy_hook)"),
    "block-hook": (lambda: with_hook("block"), {}, "model.model.layers.2: a forward hook (noisy_hook)"),
    "router-jitter": (lambda: moe(router_jitter_noise=0.2), {}, "model.config.router_jitter_noise=0.2: the prefix is"),
    "router-aux-loss": (
        lambda: moe(output_router_logits=True, router_aux_loss_coef=0.5),
        {},
        "model.config.output_router_logits: the MoE load-balancing loss collects router logits from every layer",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("hazard", list(HAZARDS))
def test_a_stochastic_hooked_or_read_prefix_is_off_with_auto_and_refused_with_true(tmp_path, token_dataset, hazard):
    """``auto`` turns the phase off with the reason and trains exactly like ``false``; ``true`` refuses."""
    build, extra, reason = HAZARDS[hazard]
    make = build or (lambda: tiny_causal_lm("llama", layers=4))
    data = rows(token_dataset)
    off = train(tmp_path, "off", data, make(), {"activations": False}, **extra)
    auto = train(tmp_path, "auto", data, make(), None, **extra)
    assert not auto[0].cache_decisions[0].on and reason in auto[0].cache_decisions[0].reason
    assert auto[0]._stores == {}
    assert_same_training(off, auto)
    with pytest.raises(StackwiseError, match=r"schedule\[0\]: " + re.escape(reason)):
        train(tmp_path, "true", data, make(), {"activations": True}, **extra)


def test_outputs_of_every_layer_turn_the_cache_off(tmp_path, token_dataset):
    from transformers import AutoModelForCausalLM

    for key in ("output_hidden_states", "output_attentions"):
        config = tiny_config("llama")
        setattr(config, key, True)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        trainer, _ = train(tmp_path, key, rows(token_dataset), model, max_steps=1)
        assert not trainer.cache_decisions[0].on
        assert trainer.cache_decisions[0].reason.startswith(f"model.config.{key}: the outputs collect every layer")


def test_config_keys_of_random_operations_are_hazards_and_head_keys_are_not():
    from hf_stackwise.cache.hazards import config_hazard

    for key in ("layerdrop", "activation_dropout", "router_jitter_noise", "drop_path_rate"):
        config = tiny_config("llama")
        setattr(config, key, 0.1)
        assert config_hazard(config).startswith(f"model.config.{key}=0.1: the prefix is stochastic"), key
    config = tiny_config("llama")
    config.classifier_dropout = 0.1  # applied to the pooled output, above every cut
    assert config_hazard(config) is None


def test_neftune_with_true_is_refused_before_any_weight_loads(tmp_path, tiny_llama_dir, pydoc_files):
    from conftest import tiny_recipe, write_recipe

    from hf_stackwise.cli.pipeline import check_recipe
    from hf_stackwise.recipe.loader import load_recipe

    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], TOP, neftune_noise_alpha=5.0)
    raw["cache"] = {"activations": True}
    message = (
        r"schedule\[0\]: training.neftune_noise_alpha: the noise changes the embeddings on every step, so the cache "
        r"cannot replay them; set `cache.activations: auto` or false"
    )
    with pytest.raises(StackwiseError, match=message):
        check_recipe(load_recipe(write_recipe(tmp_path, raw)))
    assert not os.path.exists(raw["training"]["output_dir"])


# ---- a store belongs to its run ----------------------------------------------------------------------------------


def on_disk(tmp_path) -> dict:
    return {"activations": True, "max_memory": 0, "dir": str(tmp_path / "stores")}


def store_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("blocks")) if os.path.isdir(folder) else []


SAVES = dict(save_strategy="steps", save_steps=6)


@pytest.mark.slow
def test_a_store_is_bound_to_the_compute_dtype_of_its_run(tmp_path, token_dataset):
    """A float32 run's store on disk is not reloaded into a bf16-autocast run resumed from its checkpoint (same
    prefix weights): the autocast run recomputes its rows and equals its uncached twin bitwise."""
    data = rows(token_dataset)
    train(tmp_path, "fp32", data, cache=on_disk(tmp_path), **SAVES)
    runs = {}
    for name, cache in (("bf16-off", {"activations": False}), ("bf16-on", on_disk(tmp_path))):
        shutil.copytree(tmp_path / "fp32" / "checkpoint-6", tmp_path / name / "checkpoint-6")
        runs[name] = train(tmp_path, name, data, cache=cache, resume=str(tmp_path / name / "checkpoint-6"), bf16=True)
    assert_same_training(runs["bf16-off"], runs["bf16-on"])
    assert len({n.rsplit(".", 1)[0] for n in store_files(tmp_path / "stores")}) == 2  # one store per identity


class RunAnother(TrainerCallback):
    """At step 6 of this run, trains a whole second run that shares its ``cache.dir``."""

    def __init__(self, start):
        self.start, self.other = start, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            self.other = self.start()


@pytest.mark.slow
def test_two_runs_sharing_a_cache_dir_at_once_never_read_each_others_slots(tmp_path, token_dataset):
    data = rows(token_dataset)
    off = train(tmp_path, "off", data, cache={"activations": False})
    second = RunAnother(lambda: train(tmp_path, "second", data, cache=on_disk(tmp_path)))
    first = train(tmp_path, "first", data, cache=on_disk(tmp_path), callbacks=[second])
    assert_same_training(off, first)
    assert_same_training(off, second.other)
    (mine,), (theirs,) = first[0]._stores.values(), second.other[0]._stores.values()
    assert mine.path != theirs.path and theirs.path.endswith("-w1")
    # the second run started empty: its first epoch missed although the first run had stored every row
    assert [h["cache/hit_rate"] for h in second.other[0].state.log_history if "loss" in h][:4] == [0.0] * 4


def test_overwrite_output_dir_leaves_no_stale_store(tmp_path, token_dataset):
    data = rows(token_dataset)
    cache = {"activations": True, "max_memory": 0}  # the default folder: <output_dir>/activation-cache
    train(tmp_path, "run", data, cache=cache)
    folder = tmp_path / "run" / "activation-cache"
    assert store_files(folder)
    train(tmp_path, "run", data, cache={"activations": False}, overwrite_output_dir=True)
    assert store_files(folder) == []


# ---- a damaged store -----------------------------------------------------------------------------------------------


def damage(path: str, how: str) -> None:
    size = os.path.getsize(path)
    if how == "short":
        os.truncate(path, size // 3)  # a copy interrupted
    else:
        with open(path, "r+b") as f:  # a torn write: a slot's bytes are not what was written
            f.seek(size // 2)
            f.write(os.urandom(4096))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["short", "torn"])
def test_a_damaged_store_is_rebuilt_or_missed_never_replayed(tmp_path, token_dataset, how):
    data = rows(token_dataset)
    full, _ = train(tmp_path, "full", data, cache=on_disk(tmp_path), **SAVES)
    final = full.model.state_dict()
    (store,) = full._stores.values()
    damage(f"{store.path}.data", how)
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resumed, _ = train(
        tmp_path, "resumed", data, cache=on_disk(tmp_path), resume=str(tmp_path / "resumed" / "checkpoint-6"), **SAVES
    )
    assert all(torch.equal(v, final[k]) for k, v in resumed.model.state_dict().items())
    first = next(h for h in resumed.state.log_history if h.get("step") == 7)["cache/hit_rate"]
    assert first == 0.0 if how == "short" else 0.0 < first < 1.0  # rebuilt, or only the torn slot missed


# ---- what the decision cannot know, and what padding does to a row's inputs ------------------------------------


class FixedLengthRows(torch.utils.data.Dataset):
    """A plain map-style dataset of fixed-length tensors (no Arrow table, no ``input_ids`` column to read)."""

    def __init__(self, token_dataset, n=16):
        self.rows = [torch.tensor(r) for r in token_dataset[:n]["input_ids"]]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_rows_of_unknown_length_turn_auto_off_with_the_reason(tmp_path, token_dataset):
    trainer, _ = train(tmp_path, "plain", FixedLengthRows(token_dataset), max_steps=2)
    (decision,) = trainer.cache_decisions
    assert not decision.on and decision.reason.startswith("unknown:")


def padded_rows(tokenizer, n=32, seed=0):
    """``n`` classification rows of real text, 5 to 32 tokens long."""
    from datasets import Dataset

    rng = random.Random(seed)
    ids = [tokenizer(p)["input_ids"][: rng.randint(4, 32)] for p in pydoc_paragraphs()[: 2 * n]]
    ids = [r for r in ids if len(r) >= 4][:n]
    return Dataset.from_dict({"input_ids": ids, "label": [i % 2 for i in range(n)]})


@pytest.mark.slow
def test_the_predicted_hit_rate_matches_a_padding_collator(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    config = tiny_config("llama")
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id
    data, collator = padded_rows(tokenizer), DataCollatorWithPadding(tokenizer)

    def model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config)

    forced, _ = train(tmp_path, "true", data, model(), {"activations": True}, collator=collator, max_steps=40)
    (decision,) = forced.cache_decisions
    measured = forced.cache_stats()["hit_rate"]
    assert decision.visits == 5 and 0.05 < measured < 0.4  # padding changes a row's inputs in most visits
    assert decision.hit_rate == pytest.approx(measured, abs=0.08)
    auto, _ = train(tmp_path, "auto", data, model(), None, collator=collator, max_steps=40)
    assert (
        not auto.cache_decisions[0].on
        and "padded to the longest of their micro-batch" in auto.cache_decisions[0].reason
    )


@pytest.mark.parametrize("padding", [{}, {"pad_to_multiple_of": 8}, {"padding": "max_length", "max_length": 32}])
def test_the_padding_repeat_rate_agrees_with_simulated_epochs(tokenizer, padding):
    """Against a simulation of shuffled epochs (the share of visits whose padded length equals the row's previous)."""
    import numpy as np
    from transformers import DataCollatorWithPadding

    from hf_stackwise.cache.rows import padding_repeat

    data, batch = padded_rows(tokenizer), 4
    lengths = np.array([len(r) for r in data["input_ids"]])
    multiple = padding.get("pad_to_multiple_of", 1)
    rng, last, same, visits = np.random.default_rng(0), {}, 0, 0
    for _ in range(2000):
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), batch):
            rows_ = order[start : start + batch]
            padded = padding.get("max_length") or -(-lengths[rows_].max() // multiple) * multiple
            for r in rows_:
                if r in last:
                    same, visits = same + (last[r] == padded), visits + 1
                last[r] = padded
    repeat, note = padding_repeat(data, DataCollatorWithPadding(tokenizer, **padding), batch)
    assert repeat == pytest.approx(same / visits, abs=0.01)
    assert (repeat == 1.0) == ("max_length" in padding) and (note == "") == (repeat == 1.0)


def test_the_end_of_training_summary_logs_no_hit_rate(tmp_path, token_dataset):
    trainer, _ = train(tmp_path, "run", rows(token_dataset), logging_steps=5)
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith("cache/") for k in summary)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [5, 10] and all("cache/hit_rate" in h for h in logged)
