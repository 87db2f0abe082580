"""The tasks and arms of ``benchmarks/results.py``: which recipe each arm runs, the data splits every arm shares, and
how one run's recipe is written (common model, data and training settings; the arm's own schedule and rates).

Three tasks, each with its own splits, all from ``make assets``:

* ``clm``: SmolLM2-135M-Instruct on CPython's documentation. Train: ``pydoc_train.txt``; test: the first chunks of
  ``pydoc_eval.txt`` (as ``make demo``); validation: chunks from the second half of ``pydoc_eval.txt``, disjoint
  from the test chunks. Metric: mean cross-entropy (lower is better).
* ``classify``: all-MiniLM-L6-v2 on the standard-library docstring set. Train: ``stdlib_classify_train.jsonl``
  without its validation rows (every 6th row, a fixed split); validation: those rows; test:
  ``stdlib_classify_eval.jsonl``. Metric: accuracy (macro-F1 alongside).
* ``dpo``: SmolLM2-135M-Instruct on the Python-docs preference pairs. Train: ``pydoc_pref_train.jsonl``; test: the
  first half of ``pydoc_pref_eval.jsonl``; validation: the second half. Metric: reward accuracy (margin alongside).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMOLLM2 = ".cache/models/SmolLM2-135M-Instruct"
MINILM = ".cache/models/all-MiniLM-L6-v2"
DATA = ".cache/data"
SPLITS = ".cache/data/results"  # the derived validation/test files (written by :func:`write_splits`)
QUANTIZATION = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
# training keys a recipe keeps (rates and optimizer); everything else comes from the task's common settings
KEEP_TRAINING = ("learning_rate", "weight_decay", "optim", "lr_scheduler_type", "warmup_ratio", "max_grad_norm")
KEEP_DPO = ("beta", "loss_type", "reference")


@dataclasses.dataclass(frozen=True)
class Arm:
    label: str
    recipe: str  # the recipe whose schedule (and adapters, quantization, cache, rates) the arm runs
    inline: dict | None = None  # sections replaced in that recipe (None: the recipe as written)
    origin: str = ""  # where the schedule comes from, in words


@dataclasses.dataclass(frozen=True)
class Task:
    title: str
    model: str
    steps: int  # optimizer steps of the equal-step comparison
    batch_size: int
    seq_len: int
    metric: str  # the log key scored (without the eval_<split>_ prefix)
    lower_is_better: bool
    extra: tuple  # other eval keys kept
    full: str  # the arm the equal-FLOP budget comes from
    arms: dict
    long: tuple = ()  # arms that also run the longer horizon


def lr_phase(name, train, lr, **extra) -> list:
    return [{"name": name, "until": 1.0, "train": train, "learning_rate": lr, **extra}]


CLM_ARMS = {
    "full": Arm("full fine-tuning", "recipes/demo.yaml", {"schedule": lr_phase("full", "all", 5.0e-5),
                                                          "adapters": None}, "one phase `train: all`"),
    "lora": Arm("LoRA (r 8, every stack)", "recipes/demo.yaml",
                {"schedule": lr_phase("lora", [0, 1, 2, 3, 4], 1.0e-3, adapter="lora"),
                 "adapters": {"r": 8, "alpha": 16}}, "one phase `train: [0..4], adapter: lora`, r 8"),
    "qlora-trunk": Arm("QLoRA trunk (4-bit blocks, LoRA top r 16 + trunk r 4)", "recipes/demo.yaml",
                       {"schedule": lr_phase("trunk", ["top"], 1.0e-3, adapter="lora", trunk="lora"),
                        "adapters": {"r": 16, "alpha": 32, "trunk_r": 4}, "quantization": QUANTIZATION},
                       "4-bit nf4 blocks, `train: [top], adapter: lora, trunk: lora`"),
    "unfreeze": Arm("gradual unfreezing (cache auto)", "recipes/demo.yaml", {"cache": {"activations": "auto"}},
                    "the demo's three phases, `cache: {activations: auto}`"),
    "badam": Arm("BAdam (block-coordinate cycle)", "recipes/smollm2-135m/badam.yaml"),
    "lisa": Arm("LISA (sampled stacks)", "recipes/smollm2-135m/lisa.yaml"),
    "llama-pro": Arm("LLaMA Pro expansion (4-bit trunk)", "recipes/smollm2-135m/llama_pro.yaml"),
    "autofreeze": Arm("adaptive freezing (cache auto)", "recipes/smollm2-135m/autofreeze.yaml"),
}  # fmt: skip
CLASSIFY_ARMS = {
    "full": Arm("full fine-tuning", "recipes/minilm/classify_ulmfit.yaml",
                {"schedule": lr_phase("full", "all", 1.0e-4, warmup=0.1, lr_schedule="linear"), "callbacks": None},
                "one phase `train: all` (the head trains with it)"),
    "head": Arm("head only", "recipes/minilm/classify_ulmfit.yaml",
                {"schedule": lr_phase("head", "none", 2.0e-3, warmup=0.1, lr_schedule="linear"), "callbacks": None},
                "one phase `train: none`: the new classifier head alone"),
    "ulmfit": Arm("ULMFiT gradual unfreezing", "recipes/minilm/classify_ulmfit.yaml", {"callbacks": None},
                  "its three phases (head, top, all with layer-wise decay); early stopping off"),
    "autofreeze": Arm("adaptive freezing", "recipes/minilm/classify_autofreeze.yaml", {"callbacks": None},
                      "head warm-up, then every stack until it freezes"),
}  # fmt: skip
DPO_ARMS = {
    "full": Arm("full DPO, reference copy (TRL's default)", "recipes/smollm2-135m/dpo_top.yaml",
                {"schedule": lr_phase("full", "all", 5.0e-6), "reference": "copy"},
                "one phase `train: all`, `reference: copy`"),
    "lora": Arm("DPO with LoRA (r 8, every stack)", "recipes/smollm2-135m/dpo_top.yaml",
                {"schedule": lr_phase("lora", [0, 1, 2, 3, 4], 5.0e-5, adapter="lora"),
                 "adapters": {"r": 8, "alpha": 16}, "reference": "copy"},
                "one phase `train: [0..4], adapter: lora` (reference: the adapters disabled)"),
    "top-shared": Arm("top stacks, shared reference", "recipes/smollm2-135m/dpo_top.yaml", {"reference": "shared"},
                      "its two phases (top, then top two), `reference: shared`"),
}  # fmt: skip

TASKS = {
    "clm": Task("Causal LM: SmolLM2-135M on Python's documentation", SMOLLM2, 40, 4, 64, "loss", True, (),
                "full", CLM_ARMS, ("full", "lora", "unfreeze")),
    "classify": Task("Classification: MiniLM on standard-library docstrings", MINILM, 120, 16, 128, "accuracy",
                     False, ("f1", "loss"), "full", CLASSIFY_ARMS),
    "dpo": Task("Preference tuning: DPO on SmolLM2-135M", SMOLLM2, 24, 2, 128, "rewards/accuracies", False,
                ("rewards/margins", "loss"), "full", DPO_ARMS),
}  # fmt: skip


# ---- the splits --------------------------------------------------------------------------------------------


def split_paths() -> dict:
    """task -> {train, val, test} paths, relative to the repository."""
    return {
        "clm": {
            "train": f"{DATA}/pydoc_train.txt",
            "val": f"{SPLITS}/pydoc_val.txt",
            "test": f"{DATA}/pydoc_eval.txt",
        },
        "classify": {
            "train": f"{SPLITS}/classify_train.jsonl",
            "val": f"{SPLITS}/classify_val.jsonl",
            "test": f"{DATA}/stdlib_classify_eval.jsonl",
        },
        "dpo": {
            "train": f"{DATA}/pydoc_pref_train.jsonl",
            "val": f"{SPLITS}/pref_val.jsonl",
            "test": f"{SPLITS}/pref_test.jsonl",
        },
    }


def write_splits() -> dict:
    """Write the derived split files (deterministic, from the assets alone); returns their sha1 by name."""
    out = os.path.join(ROOT, SPLITS)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(ROOT, DATA, "pydoc_eval.txt")) as f:
        lines = f.read().splitlines(keepends=True)
    half = len(lines) // 2  # the test chunks are the file's first 32 x 64 tokens, well inside its first half
    files = {"pydoc_val.txt": "".join(lines[half:])}
    with open(os.path.join(ROOT, DATA, "stdlib_classify_train.jsonl")) as f:
        rows = [line for line in f if line.strip()]
    files["classify_val.jsonl"] = "".join(rows[5::6])
    files["classify_train.jsonl"] = "".join(r for i, r in enumerate(rows) if i % 6 != 5)
    with open(os.path.join(ROOT, DATA, "pydoc_pref_eval.jsonl")) as f:
        pairs = [line for line in f if line.strip()]
    files["pref_test.jsonl"] = "".join(pairs[: len(pairs) // 2])
    files["pref_val.jsonl"] = "".join(pairs[len(pairs) // 2 :])
    digests = {}
    for name, text in files.items():
        path = os.path.join(out, name)
        if not os.path.exists(path) or open(path).read() != text:
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        digests[name] = hashlib.sha1(text.encode()).hexdigest()
    return digests


# ---- one run's recipe --------------------------------------------------------------------------------------


def scale_rates(node, factor: float):
    """Every ``learning_rate`` under ``node`` (phases, generator templates) times ``factor``."""
    if isinstance(node, dict):
        return {k: (v * factor if k == "learning_rate" and isinstance(v, (int, float)) else scale_rates(v, factor))
                for k, v in node.items()}  # fmt: skip
    if isinstance(node, list):
        return [scale_rates(v, factor) for v in node]
    return node


def data_section(task: str, split: str, settings: dict) -> dict:
    paths = split_paths()[task]
    if task == "clm":
        return {
            "task": "clm",
            "train": {"path": "text", "data_files": paths["train"]},
            "eval": {"path": "text", "data_files": paths[split]},
            "max_eval_samples": settings["eval_samples"] // (2 if split == "val" else 1),  # val only picks rates
            "text_column": "text",
            "max_seq_length": settings["seq_len"],
        }
    if task == "classify":
        return {
            "task": "classification",
            "train": {"path": "json", "data_files": paths["train"]},
            "eval": {"path": "json", "data_files": paths[split]},
            "text_column": "text",
            "label_column": "label",
            "max_seq_length": settings["seq_len"],
        }
    return {
        "task": "dpo",
        "train": {"path": "json", "data_files": paths["train"]},
        "eval": {"path": "json", "data_files": paths[split]},
        "max_seq_length": settings["seq_len"],
    }


def eval_batch(task: str) -> int:
    """8, but 1 for DPO: TRL pads an eval batch to its longest pair (about twice the mean length here) and averages
    its reward metrics over batches, so one pair per batch spends nothing on padding and weighs every pair equally."""
    return 1 if task == "dpo" else 8


START_RATE = 1.0  # the grid run of this factor also evaluates before training: the start of every curve of its arm


def grid_run(run: dict, settings: dict) -> bool:
    """A run of the rate grid (seed 0, the task's steps): the only runs scored on the validation split."""
    return run["seed"] == 0 and run["steps"] == settings["steps"]


def eval_splits(run: dict, settings: dict) -> tuple:
    """The splits a run evaluates: the test split always; the validation split only in the grid, where rates are
    chosen on it (every other run would spend evals on numbers nothing reads)."""
    return ("test", "val") if grid_run(run, settings) else ("test",)


def recipe_text(arm: Arm) -> bytes | None:
    path = os.path.join(ROOT, arm.recipe)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def run_recipe(task: str, arm_name: str, run: dict, settings: dict, output_dir: str, split: str) -> dict | None:
    """The raw recipe of one run (``run``: seed, rate factor, steps) with ``split`` as its eval set; None when the
    arm's recipe does not exist."""
    import yaml

    spec, arm = TASKS[task], TASKS[task].arms[arm_name]
    text = recipe_text(arm)
    if text is None:
        return None
    raw = yaml.safe_load(text)
    for key, value in (arm.inline or {}).items():
        if key == "quantization":
            raw["model"]["quantization"] = value
        elif key == "reference":
            raw.setdefault("training", {})["reference"] = value
        elif value is None:
            raw.pop(key, None)
        else:
            raw[key] = copy.deepcopy(value)
    raw["model"]["name_or_path"] = spec.model
    raw["data"] = data_section(task, split, settings)
    kept = KEEP_TRAINING + (KEEP_DPO if task == "dpo" else ())
    training = {k: v for k, v in (raw.get("training") or {}).items() if k in kept}
    training.update(
        output_dir=output_dir,
        overwrite_output_dir=True,
        max_steps=run["steps"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=eval_batch(task),
        logging_steps=1,
        eval_strategy="steps",
        # before training, once per arm: in its grid's ×1 run (every factor starts from the same weights; DPO: a
        # policy equal to its reference has rewards 0, no eval needed)
        eval_on_start=task != "dpo" and grid_run(run, settings) and run["rate"] == START_RATE,
        eval_steps=max(1, -(-run["steps"] // settings["evals"])),  # ceil: `evals` evals, the last at the end
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=run["seed"],
        disable_tqdm=True,
    )
    raw["training"] = training
    raw = scale_rates(raw, run["rate"])
    for phase in raw.get("schedule") or []:
        for generator in ("sample", "cycle"):  # each seed draws other stacks
            if isinstance(phase, dict) and isinstance(phase.get(generator), dict):
                spec_ = phase[generator]
                spec_["seed"] = (spec_.get("seed", 0) if isinstance(spec_.get("seed", 0), int) else 0) + run["seed"]
    return raw


def recipe_sha(task: str, arm_name: str) -> str | None:
    """sha1 of what decides the arm's schedule: its recipe file and inline replacements."""
    arm = TASKS[task].arms[arm_name]
    text = recipe_text(arm)
    if text is None:
        return None
    return hashlib.sha1(text + json.dumps(arm.inline, sort_keys=True).encode()).hexdigest()
