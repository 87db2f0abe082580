"""Memory of full fine-tuning against LoRA and QLoRA-trunk phases on a real pretrained model, and the size of its
weights in fp32, bf16 and 4-bit.

Run it (CPU only, offline; about 2 minutes with the defaults on 2 quiet cores)::

    python benchmarks/memory.py
    python benchmarks/memory.py --configs full,qlora-trunk --steps 2 --no-footprint   # a quicker look
    python benchmarks/memory.py --model path/to/another/causal-lm --threads 1

The model is SmolLM2-135M-Instruct from ``.cache/models`` (Llama, 30 blocks, hidden 576, vocab 49152, tied
embeddings, float32 checkpoint; ``make assets`` puts it there); ``--model`` takes any local causal-LM folder. The
data are real prose (``.cache/data/pydoc_train.txt``, tokenized and cut into ``--seq-len`` tokens by the package).

The configurations, each trained for ``--steps`` optimizer steps (AdamW, lr 5e-5, batch ``--batch-size``,
non-quantized weights in float32, ``rack.blocks_per_stack: 6``, i.e. 5 stacks of 6 blocks) through the package's
own path ``run.prepare`` -> ``run.load_model`` -> ``run.build_trainer`` -> ``trainer.train()``:

* ``full``: full fine-tuning, one phase ``{train: all}``, no quantization; the baseline of the ratios;
* ``qlora-trunk``: ``model.quantization: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: float32}``,
  one phase ``{train: [top], adapter: lora, trunk: lora}`` with ``adapters: {r: 16, alpha: 32, trunk_r: 4}``: the
  top stack trains through its LoRA adapter (r 16), the 4-bit trunk below it through the trunk adapter (r 4);
  every block is 4-bit, the embeddings (tied head) stay float32 and frozen, only LoRA parameters train;
* ``lora-fp32``: the same schedule and adapters on the float32 model (the reference for what 4-bit adds).

Each configuration runs in a fresh subprocess (``python benchmarks/memory.py --worker CONFIG``), so its peak
resident set size (``ru_maxrss``) is its own. The worker reports, as one JSON line the parent parses:

* ``base RSS``: VmRSS after the imports, the data and ``run.prepare``, before any weight is loaded (the
  process baseline: Python, torch, transformers, datasets, the tokenizer);
* ``load RSS``: VmRSS right after the model is loaded, split into ``anon`` (RssAnon: heap, tensors) and ``file``
  (RssFile: mapped files, mostly the safetensors checkpoint); ``load peak`` is ru_maxrss at that point;
* ``peak RSS``: ru_maxrss at the end of training; ``net peak`` is peak minus base RSS, the part the model and
  the training need (the process baseline dilutes the ``peak RSS`` ratios); ``peak anon`` is RssAnon sampled
  every 20 ms by a thread over load and training; ``end file`` is RssFile after training;
* ``trainable``: parameters the optimizer holds (the schedule's superset, summed over
  ``trainer.optimizer.param_groups``), as a count and in bytes (numel x element size);
* ``optim``: bytes of every tensor in ``trainer.optimizer.state`` (AdamW: two moments per trainable value);
* ``grad``: bytes of the gradients present just before an optimizer step (largest over the steps);
* ``step s`` / ``cpu s``: median wall / process-CPU time of a training step (``on_step_begin`` to
  ``on_step_end``) without the first step (``1st s``), which allocates the optimizer state; ``loss``: the run's
  mean training loss (a sanity check); ``other CPU``: the machine's CPU other processes used meanwhile.

Why RSS needs the anon/file split: transformers memory-maps the safetensors checkpoint. A float32 load keeps
the weights as views of that mapping and pages them in lazily (load RSS barely moves; the pages count as
``file`` once the first forward touches them, and full fine-tuning turns them into ``anon`` by writing to them).
The 4-bit load reads every page to quantize it, and since the float32 embedding is still a view of the mapping,
the whole checkpoint stays mapped and resident (``file`` about the checkpoint's size) although only the
embedding is used: clean pages the kernel can drop, but they count in ru_maxrss.

The footprint worker loads the model four times (fp32, bf16, nf4 with float32 rest as trained here, nf4 with
bfloat16 rest), with the same ``BitsAndBytesConfig`` and skip list the package builds, and sums the bytes of
parameters and buffers (what ``get_memory_footprint()`` counts) plus, for 4-bit, the quantization state
(absmax, code tables, nested absmax) that ``get_memory_footprint()`` leaves out. ``blocks`` counts only tensors
under the block list (``model.layers.``): bitsandbytes does not quantize the embedding matrix (49152 x 576,
tied with the head), a large share of a model this small, so the ``blocks`` ratio shows what 4-bit does where it
applies (about 0.26 of bf16: 4 bits per weight plus a one-byte absmax per 64 weights).

How to read it: the ratios are against ``full`` (or bf16 for the weights), measured in the same run. RSS
includes the allocator's cached and fragmented memory (the 4-bit load leaves a few hundred MiB of freed heap
behind, varying between runs), so it moves by tens to hundreds of MiB; the trainable, gradient, optimizer and
weight bytes are exact. At batch 4 x 128 the activations and temporaries (the 49152-wide logits and their loss
alone take several hundred MiB) come to about 1.5 GiB in every configuration, so dropping the gradients and AdamW
state of full fine-tuning (1.5 GiB) cuts the peak by about a quarter, not by the 65x of the trainable bytes; and
the 4-bit weights save little RSS against lora-fp32, whose frozen weights are clean mapped pages (in the runs
made so far QLoRA's peak RSS came out 5-10% above lora-fp32's). Measured on 2 quiet cores: a step takes about
5 s for full fine-tuning (AdamW over 134M values included), 4.3 s for LoRA, 4.0 s for QLoRA; loads take 0.3-4 s.
Step times are very sensitive to other load: with one of the two cores taken by another process, torch's two
threads wait on each other and steps took 5-15x longer; the ``other CPU`` column shows it (try ``--threads 1``).
This is a report, not a test: the exit status is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_MODEL = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct")
DEFAULT_DATA = os.path.join(ROOT, ".cache", "data", "pydoc_train.txt")
CONFIGS = ("full", "qlora-trunk", "lora-fp32")
FOOTPRINT = "footprint"
QUANTIZATION = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
ADAPTERS = {"r": 16, "alpha": 32, "trunk_r": 4}
BLOCKS_PER_STACK = 6
FULL_SCHEDULE = [{"name": "all", "until": 1.0, "train": "all"}]
LORA_SCHEDULE = [{"name": "trunk", "until": 1.0, "train": ["top"], "adapter": "lora", "trunk": "lora"}]
RESULT_TAG = "MEMORY-BENCH-RESULT "


from common import cpu_jiffies  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from memory_tables import mem_total, print_footprint_table, print_training_table, version  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Peak memory of full fine-tuning vs LoRA / QLoRA-trunk phases, and 4-bit vs bf16 weight size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local causal-LM folder (Hugging Face layout)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="plain-text training file")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (>= 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device train batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (data.max_seq_length)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated training configurations among {CONFIGS}"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads in the workers; unset: torch's default"
    )
    parser.add_argument("--no-footprint", action="store_true", help="skip the fp32 / bf16 / 4-bit weight footprint")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per worker subprocess")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    return parser


# ---- measurements inside a worker --------------------------------------------------------------


def status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, RssAnon, RssFile, ...); 0 where /proc is missing."""
    found = dict.fromkeys(keys, 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return found


class AnonSampler:
    """A daemon thread that samples RssAnon (private memory: heap, tensors) every ``interval`` seconds and keeps the
    maximum. ru_maxrss also counts file-backed pages, such as a memory-mapped checkpoint still resident after the
    load; the sampled anonymous peak leaves those out (it can miss transients shorter than the interval)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self.peak = status_kib("RssAnon")["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, status_kib("RssAnon")["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon")["RssAnon"])
        return self.peak


def peak_kib() -> int:
    """Peak resident set size of this process in KiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def tensor_bytes(tensor) -> int:
    return tensor.nelement() * tensor.element_size()


def quant_state_tensors(param) -> list:
    """Tensors of a bitsandbytes 4-bit parameter's quantization state (absmax, code, offset, nested state)."""
    state = getattr(param, "quant_state", None)
    found = []
    while state is not None:
        found += [getattr(state, k, None) for k in ("absmax", "code", "offset")]
        state = getattr(state, "state2", None)
    import torch

    return [t for t in found if isinstance(t, torch.Tensor)]


def weight_bytes(model, prefix: str) -> dict:
    """Bytes of the model's parameters and buffers (each tensor once), in total and under ``prefix``; for 4-bit
    parameters the packed storage is the parameter and the quantization state is counted on top."""
    seen: set[tuple[int, int]] = set()
    totals = {"total": 0, "blocks": 0, "quant_state": 0, "params": 0}

    def add(name: str, tensor, kind: str = "tensor") -> None:
        key = (tensor.data_ptr(), tensor_bytes(tensor))
        if key in seen:
            return
        seen.add(key)
        size = tensor_bytes(tensor)
        totals["total"] += size
        if kind == "quant_state":
            totals["quant_state"] += size
        if name.startswith(prefix):
            totals["blocks"] += size

    for name, param in model.named_parameters():
        totals["params"] += param.numel()
        add(name, param)
        for state_tensor in quant_state_tensors(param):
            add(name, state_tensor, "quant_state")
    for name, buffer in model.named_buffers():
        add(name, buffer)
    totals["get_memory_footprint"] = model.get_memory_footprint()
    return totals


def make_recipe(config: str, args, output_dir: str) -> dict:
    lora = config != "full"
    model = {"name_or_path": args.model, "dtype": "float32"}
    if config == "qlora-trunk":
        model["quantization"] = dict(QUANTIZATION)
    raw = {
        "model": model,
        "rack": {"blocks_per_stack": BLOCKS_PER_STACK},
        "data": {"train": {"path": "text", "data_files": args.data}, "max_seq_length": args.seq_len},
        "schedule": LORA_SCHEDULE if lora else FULL_SCHEDULE,
        "training": {
            "output_dir": output_dir,
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
            "seed": 0,
            "disable_tqdm": True,
        },
    }
    if lora:
        raw["adapters"] = dict(ADAPTERS)
    return raw


def quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def train_worker(config: str, args) -> dict:
    """Train one configuration; returns its measurements."""
    import statistics
    import tempfile

    import torch
    from transformers import PrinterCallback, TrainerCallback

    from hf_stackwise.cli import pipeline as run
    from hf_stackwise.recipe.loader import validate_recipe

    quiet_libraries()

    class StepProbe(TrainerCallback):
        """Step spans, and the bytes of the gradients present just before each optimizer step."""

        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []
            self.cpu_begin: list[float] = []
            self.cpu_end: list[float] = []
            self.grad_bytes = 0
            self.model = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())
            self.cpu_begin.append(time.process_time())

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = sum(tensor_bytes(p.grad) for p in self.model.parameters() if p.grad is not None)
            self.grad_bytes = max(self.grad_bytes, grads)

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())
            self.cpu_end.append(time.process_time())

    with tempfile.TemporaryDirectory(prefix="stackwise-memory-") as tmp:
        recipe = validate_recipe(make_recipe(config, args, os.path.join(tmp, "run")))
        prepared = run.prepare(recipe)
        base = status_kib("VmRSS", "RssAnon", "RssFile")
        sampler = AnonSampler()
        started = time.perf_counter()
        model = run.load_model(prepared)
        load_seconds = time.perf_counter() - started
        load, load_peak = status_kib("VmRSS", "RssAnon", "RssFile"), peak_kib()
        trainer = run.build_trainer(prepared, model=model)
        trainer.remove_callback(PrinterCallback)  # logging_steps 1 would print every step's logs
        probe = StepProbe()
        probe.model = trainer.model
        trainer.add_callback(probe)
        output = trainer.train()
        peak = peak_kib()
        peak_anon = sampler.stop()
        end = status_kib("VmRSS", "RssAnon", "RssFile")

        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        optimized = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        state_bytes = sum(
            tensor_bytes(value)
            for per_param in optimizer.state.values()
            for value in per_param.values()
            if isinstance(value, torch.Tensor)
        )
        requires_grad = [p for p in trainer.model.parameters() if p.requires_grad]
        four_bit = sum(1 for p in trainer.model.parameters() if getattr(p, "quant_state", None) is not None)
        steps = [e - b for b, e in zip(probe.begin, probe.end)]
        cpu = [e - b for b, e in zip(probe.cpu_begin, probe.cpu_end)]
        result = {
            "config": config,
            "base_rss_kib": base["VmRSS"],
            "base_anon_kib": base["RssAnon"],
            "load_rss_kib": load["VmRSS"],
            "load_anon_kib": load["RssAnon"],
            "load_file_kib": load["RssFile"],
            "load_peak_kib": load_peak,
            "peak_kib": peak,
            "peak_anon_kib": peak_anon,
            "end_rss_kib": end["VmRSS"],
            "end_file_kib": end["RssFile"],
            "load_s": load_seconds,
            "trainable_params": sum(p.numel() for p in optimized.values()),
            "trainable_bytes": sum(tensor_bytes(p) for p in optimized.values()),
            "requires_grad_params": sum(p.numel() for p in requires_grad),
            "total_params": sum(p.numel() for p in trainer.model.parameters()),
            "four_bit_tensors": four_bit,
            "optimizer_state_bytes": state_bytes,
            "grad_bytes": probe.grad_bytes,
            "param_groups": len(optimizer.param_groups),
            "optimizer": type(optimizer).__name__,
            "steps": len(steps),
            "step_s": statistics.median(steps[1:] or steps) if steps else float("nan"),
            "step_cpu_s": statistics.median(cpu[1:] or cpu) if cpu else float("nan"),
            "first_step_s": steps[0] if steps else float("nan"),
            "loss": output.training_loss,
            "torch_threads": torch.get_num_threads(),
            "num_examples": len(prepared.train_dataset),
            "rack": prepared.rack["boundaries"],
        }
    return result


def footprint_worker(args) -> dict:
    """Weight bytes of the model in fp32, bf16 and nf4 (float32 and bfloat16 rest), loaded one after the other."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from hf_stackwise.rack.quantization import bnb_config, full_precision_modules
    from hf_stackwise.rack.rack import find_layers_path
    from hf_stackwise.schedule.phases import Schedule

    quiet_libraries()
    rows = []
    variants = (
        ("fp32", torch.float32, False),
        ("bf16", torch.bfloat16, False),
        ("nf4 + fp32 rest", torch.float32, True),
        ("nf4 + bf16 rest", torch.bfloat16, True),
    )
    layers = skip = None
    for label, dtype, quantized in variants:
        kwargs = {}
        if quantized:
            kwargs["quantization_config"] = bnb_config(QUANTIZATION, skip)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs)
        seconds = time.perf_counter() - started
        if layers is None:  # the skip rules of the qlora-trunk configuration, as run.prepare derives them
            layers = find_layers_path(model)
            num_blocks = len(model.get_submodule(layers))
            boundaries = list(range(0, num_blocks, BLOCKS_PER_STACK)) + [num_blocks]
            skip = full_precision_modules(model, layers, Schedule.from_list(LORA_SCHEDULE), boundaries)
        sizes = weight_bytes(model, layers + ".")
        sizes.update(label=label, load_s=seconds)
        sizes["four_bit_tensors"] = sum(1 for p in model.parameters() if getattr(p, "quant_state", None) is not None)
        rows.append(sizes)
        del model
        gc.collect()
    return {"config": FOOTPRINT, "layers": layers, "skip_modules": skip, "rows": rows}


def worker_main(args) -> int:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = footprint_worker(args) if args.worker == FOOTPRINT else train_worker(args.worker, args)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ---- the parent: spawn workers, print the tables ---------------------------------------------------


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spawn(config: str, args) -> tuple[dict | None, float, str]:
    """Run one worker subprocess; returns (its result or None, wall seconds, error text). The result gets
    ``other_cpu``: the share of the machine's CPU time other processes used while the worker ran."""
    import subprocess

    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        config,
        "--model",
        args.model,
        "--data",
        args.data,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started, jiffies, own = time.perf_counter(), cpu_jiffies(), children_cpu()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - started, f"timed out after {args.timeout:.0f} s"
    seconds = time.perf_counter() - started
    end = cpu_jiffies()
    other = None
    if jiffies is not None and end is not None and end[1] > jiffies[1]:
        worker = (children_cpu() - own) * os.sysconf("SC_CLK_TCK")
        other = max(0.0, (end[0] - jiffies[0]) - worker) / (end[1] - jiffies[1])
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            result["other_cpu"] = other
            return result, seconds, ""
    tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
    return None, seconds, f"exit status {out.returncode}, no result; last output:\n{tail}"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    if args.worker is not None:
        if args.worker not in (*CONFIGS, FOOTPRINT):
            make_parser().error(f"--worker {args.worker!r} is not one of {(*CONFIGS, FOOTPRINT)}")
        return worker_main(args)

    import platform

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or args.steps < 2 or args.batch_size < 1 or args.seq_len < 1:
        make_parser().error(f"need --configs among {CONFIGS} (got {unknown}), --steps >= 2, positive sizes")
    if not os.path.isdir(args.model) or not os.path.isfile(args.data):
        make_parser().error(f"{args.model!r} must be a model folder and {args.data!r} a text file (make assets)")

    started = time.perf_counter()
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    print("hf_stackwise memory: full fine-tuning vs LoRA / QLoRA-trunk phases, and 4-bit weights")
    print(
        f"  python {platform.python_version()}  {platform.platform()}  cpu cores {os.cpu_count()}  RAM {mem_total()}"
    )
    print(
        "  "
        + "  ".join(
            f"{name} {version(name)}"
            for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "hf-stackwise")
        )
    )
    print(
        f"  model {args.model}: {config.get('model_type')}, {config.get('num_hidden_layers')} blocks, hidden "
        f"{config.get('hidden_size')}, intermediate {config.get('intermediate_size')}, "
        f"vocab {config.get('vocab_size')}, tied embeddings {config.get('tie_word_embeddings')}, "
        f"checkpoint dtype {config.get('dtype')}"
    )
    print(
        f"  data {args.data}  steps {args.steps}  batch {args.batch_size}  seq len {args.seq_len}  "
        f"rack.blocks_per_stack {BLOCKS_PER_STACK}  non-quantized weights float32"
    )
    print(f"  qlora-trunk: quantization {QUANTIZATION}, adapters {ADAPTERS}, schedule {LORA_SCHEDULE}")
    print(f"  full: schedule {FULL_SCHEDULE}; lora-fp32: the qlora-trunk schedule and adapters without quantization")
    print("  each configuration in its own subprocess (peak RSS per configuration)", flush=True)

    results: dict[str, dict] = {}
    threads = set()
    for config_name in configs:
        result, seconds, error = spawn(config_name, args)
        if result is None:
            print(f"  {config_name}: FAILED after {seconds:.0f} s: {error}", flush=True)
            continue
        results[config_name] = result
        threads.add(result["torch_threads"])
        print(
            f"  {config_name}: done in {seconds:.0f} s ({result['num_examples']} training sequences, rack "
            f"{result['rack']}, peak RSS {result['peak_kib'] / 1024:.0f} MiB)",
            flush=True,
        )
    footprint = None
    if not args.no_footprint:
        footprint, seconds, error = spawn(FOOTPRINT, args)
        if footprint is None:
            print(f"  footprint: FAILED after {seconds:.0f} s: {error}", flush=True)
        else:
            print(f"  footprint: done in {seconds:.0f} s", flush=True)
    if threads:
        print(f"  torch threads in the workers: {sorted(threads)}")
    busy = [name for name, r in results.items() if (r.get("other_cpu") or 0) > 0.10]
    if busy:
        print(
            f"  NOTE: other processes used over 10% of the CPU during {', '.join(busy)}: their step times are not\n"
            "  comparable (torch's threads wait on each other when a core is taken); rerun on a quiet machine or\n"
            "  with --threads 1. The byte counts are unaffected, RSS hardly."
        )

    if results:
        print_training_table(results)
    if footprint is not None:
        print_footprint_table(footprint)
    print()
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
