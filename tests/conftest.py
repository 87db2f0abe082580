"""Shared fixtures: tiny models built from configs (4+ layers, vocab <= 1000), a tiny byte-level BPE
tokenizer trained on real text (`pydoc_data.topics`), and the offline demo assets. Never touches the network."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VOCAB = 512


def pydoc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            line = " ".join(block.split())
            if line:
                out.append(line)
    return out


def build_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer trained in-process on real text, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(pydoc_paragraphs(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", mask_token="[MASK]")


def tiny_config(family: str = "llama", layers: int = 4, vocab: int = VOCAB):
    """A tiny config of one architecture family (hidden 64, 4 heads)."""
    from transformers import AutoConfig

    common = {"vocab_size": vocab}
    if family in ("llama", "qwen2", "mistral"):
        extra = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    elif family == "gpt2":
        extra = dict(n_embd=64, n_layer=layers, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    elif family == "gpt_neox":
        extra = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    elif family in ("bert", "roberta"):
        extra = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256 + 2,
            pad_token_id=1,
        )
    else:
        raise ValueError(family)
    return AutoConfig.for_model(family, **common, **extra)


def tiny_causal_lm(family: str = "llama", layers: int = 4, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, layers)
    if family in ("llama", "qwen2", "mistral", "gpt_neox"):
        config.attention_dropout = 0.0
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama (4 blocks) with the tiny tokenizer: a local 'pretrained' model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama", layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_30_block_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with SmolLM2's 30 blocks, so the shipped SmolLM2 recipes run unchanged but for the model."""
    folder = tmp_path_factory.mktemp("tiny-30")
    tiny_causal_lm("llama", layers=30).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def pydoc_files(tmp_path_factory):
    """Train/eval text files of real prose (one paragraph per line)."""
    folder = tmp_path_factory.mktemp("pydoc")
    paragraphs = pydoc_paragraphs()
    cut = len(paragraphs) * 9 // 10
    train, evaluation = folder / "train.txt", folder / "eval.txt"
    train.write_text("\n".join(paragraphs[:cut]) + "\n")
    evaluation.write_text("\n".join(paragraphs[cut:]) + "\n")
    return str(train), str(evaluation)


@pytest.fixture(scope="session")
def token_dataset(tokenizer):
    """Chunks of 32 tokens of real text, as a datasets.Dataset with labels."""
    from datasets import Dataset

    ids = tokenizer("\n".join(pydoc_paragraphs()[:400]))["input_ids"]
    n = 32
    chunks = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)][:256]
    return Dataset.from_dict({"input_ids": chunks, "labels": chunks})


def tiny_arguments(output_dir, **overrides):
    """``StackwiseArguments`` for a short CPU run of a tiny model: 4 steps, batch 4, one block per stack, seeded, no
    saves or reports; ``overrides`` (``schedule`` among them) replace or add to these."""
    from hf_stackwise.trainer import StackwiseArguments

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        blocks_per_stack=1,
    )
    kwargs.update(overrides)
    return StackwiseArguments(**kwargs)


CLEAN_LOAD = (
    "import sys, torch, json; from transformers import AutoModelForCausalLM;"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); ids = torch.tensor(json.loads(sys.argv[2]));"
    "torch.save(m(input_ids=ids).logits.detach(), sys.argv[3]);"
    "print(any(k in sys.modules for k in ('peft', 'hf_stackwise', 'bitsandbytes')))"
)


def logits_in_clean_process(folder, ids, tmp_path):
    """Load ``folder`` with plain transformers in a fresh process (no hf_stackwise, peft or bitsandbytes) and
    return its logits on ``ids``."""
    import json
    import subprocess

    out_file = tmp_path / "clean-logits.pt"
    out = subprocess.run(
        [sys.executable, "-c", CLEAN_LOAD, str(folder), json.dumps(ids.tolist()), str(out_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("False"), "the export needed hf_stackwise, peft or bitsandbytes to load"
    return torch.load(out_file)


def tiny_recipe(tmp_path, model_dir, train_file, schedule, adapters=None, **training) -> dict:
    """A small recipe mapping for a tiny model: 4 steps of batch 4 x 32 tokens, lr 1e-2, no checkpoints."""
    raw = {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "data": {"train": {"path": "text", "data_files": train_file}, "max_seq_length": 32},
        "schedule": schedule,
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            **training,
        },
    }
    if adapters is not None:
        raw["adapters"] = adapters
    return raw


def write_recipe(tmp_path, raw: dict) -> str:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def brief_run_args(recipe: str, model_dir: str, tmp_path, *extra: str) -> list[str]:
    """`hf-stackwise train` arguments that run a shipped recipe unchanged but for the model (a tiny one) and the
    length: 4 steps of batch 2 x 32 tokens, no eval, no checkpoints."""
    return [
        "train",
        recipe,
        "--model.name_or_path",
        model_dir,
        "--training.output_dir",
        str(tmp_path / "run"),
        "--training.max_steps",
        "4",
        "--training.per_device_train_batch_size",
        "2",
        "--data.max_seq_length",
        "32",
        "--training.eval_strategy",
        "no",
        "--training.save_strategy",
        "no",
        *extra,
    ]
