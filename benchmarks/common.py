"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` where there is none)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (empty where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class CpuShare:
    """Share of the machine's CPU that other processes used since construction (this process excluded)."""

    def __init__(self):
        self.start, self.own = cpu_jiffies(), sum(os.times()[:4])

    def other(self) -> float | None:
        end = cpu_jiffies()
        if self.start is None or end is None or end[1] == self.start[1]:
            return None
        own = (sum(os.times()[:4]) - self.own) * os.sysconf("SC_CLK_TCK")
        return max(0.0, (end[0] - self.start[0]) - own) / (end[1] - self.start[1])


def cache_step_timer():
    """A TrainerCallback timing every step and counting the activation cache's hits and looked-up rows in it
    (set its ``trainer`` before training)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Step spans, the train loop's span, and the cache's hits / looked-up rows per step."""

        def __init__(self):
            self.trainer = None
            self.steps: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.train_s = time.perf_counter() - self.train_begin

        def on_step_begin(self, args, state, control, **kwargs):
            self.counts = list(getattr(self.trainer, "_cache_counts", [0, 0]))
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            span = time.perf_counter() - self.begin
            now = getattr(self.trainer, "_cache_counts", [0, 0])
            phase = self.trainer._phase_state.index if self.trainer._phase_state is not None else 0
            self.steps.append(
                {"s": span, "hits": now[0] - self.counts[0], "rows": now[1] - self.counts[1], "phase": phase}
            )

    return StepTimer()


def pydoc_corpus(rows: int, seq: int, folder: str) -> str:
    """The first lines of the Python-docs training text holding about ``rows`` chunks of ``seq`` SmolLM2 tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "models", "SmolLM2-135M-Instruct"
        )
    )
    kept, tokens = [], 0
    with open(os.path.join(ROOT, ".cache", "data", "pydoc_train.txt")) as f:
        for line in f:
            if tokens >= rows * seq + seq // 2:
                break
            kept.append(line)
            tokens += len(tokenizer(line)["input_ids"])
    path = os.path.join(folder, "train.txt")
    with open(path, "w") as f:
        f.writelines(kept)
    return path
