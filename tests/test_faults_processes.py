"""Faults in real processes: `hf-stackwise train` killed with SIGKILL at chosen moments (while a checkpoint is being
written, at a phase boundary, at random times) and resumed with `--training.resume_from_checkpoint true` ends
bitwise equal to the uninterrupted run; SIGTERM stops the CLI after a complete checkpoint of the current step (exit
143, well within a grace period), also with 2 ranks (signal to torchrun, to one rank only, or to `accelerate
launch`)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from safetensors.torch import load_file

from hf_stackwise.persist.checkpoint import COMPLETE_NAME, incomplete_reason, last_complete_checkpoint, read_json

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 24  # phases end at steps 8 and 16; a checkpoint every 2 steps
SCHEDULE = [
    {"name": "top", "until": 1 / 3, "train": ["top"]},
    {"name": "lower", "until": 2 / 3, "train": [0, 1], "embeddings": "train"},
    {"name": "all", "until": 1.0, "train": "all", "lr_schedule": "cosine"},
]
RESUME = ["--training.resume_from_checkpoint", "true"]
STARTED = "[hf_stackwise] step"  # the first phase line: training has started
CONNECTION_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Address already in use")


class Run:
    """A training process whose output lines are collected as they come (unbuffered)."""

    def __init__(self, argv: list[str]):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE)])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(s,), daemon=True) for s in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout: float = 240) -> float:
        end = time.monotonic() + timeout
        while not self.saw(text):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.output()[-3000:]}"
            assert time.monotonic() < end, f"no {text!r} after {timeout} s"
            time.sleep(0.002)
        return time.monotonic()

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL the process, and check that the kill is what ended it (not a run that had already finished)."""
        self.proc.send_signal(signal.SIGKILL)
        code = self.finish()
        assert code == -signal.SIGKILL, f"exited {code} before the kill:\n{self.output()[-3000:]}"


def cli(recipe: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hf_stackwise", "train", recipe, *extra]


def torchrun(recipe: str, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return launcher + ["-m", "hf_stackwise", "train", recipe, *extra]


def free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def accelerate_launch(recipe: str, *extra: str) -> list[str]:
    """Two CPU processes under `accelerate launch` (`--cpu` would run one; `--multi_gpu` with `use_cpu` runs two)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]
    return launcher + ["-m", "hf_stackwise", "train", recipe, "--training.use_cpu", "true", *extra]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "model.safetensors"))


def max_delta(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert all(torch.equal(a[n], b[n]) for n in a), f"max |delta| = {max_delta(a, b)}"


def fault_recipe(tmp_path, model_dir, train_file, name: str, **training) -> str:
    settings = dict(max_steps=STEPS, save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=1e-3)
    settings.update(training, output_dir=str(tmp_path / name))
    raw = tiny_recipe(tmp_path, model_dir, train_file, SCHEDULE, **settings)
    raw["rack"] = {"blocks_per_stack": 1}
    (tmp_path / f"recipe-{name}").mkdir(exist_ok=True)
    return write_recipe(tmp_path / f"recipe-{name}", raw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir, pydoc_files):
    tmp = tmp_path_factory.mktemp("faults")
    recipe = fault_recipe(tmp, tiny_llama_dir, pydoc_files[0], "whole")
    run = Run(cli(recipe))
    assert run.finish() == 0, run.output()[-3000:]
    return tmp, final_weights(tmp / "whole")


def checkpoint_being_written(run_dir, stage: str, ignore=()):
    """A checkpoint folder without its completion marker (``stage="late"``: its trainer_state.json is written)."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    for name in sorted(set(names) - set(ignore)):
        folder = os.path.join(run_dir, name)
        if name.startswith("checkpoint-") and not os.path.exists(os.path.join(folder, COMPLETE_NAME)):
            if stage == "any" or os.path.exists(os.path.join(folder, "trainer_state.json")):
                return folder
    return None


def kill_while_writing(run: Run, run_dir, stage: str, after_step: int = 0) -> str | None:
    """SIGSTOP the process when a checkpoint (past ``after_step``) is being written; if it still is, SIGKILL it
    there (the moment is verified, not hoped for); else let it go on. Returns the folder, or None (run ended).
    Folders left half-written by an earlier kill are not taken for the moment."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    stale = [n for n in names if n.startswith("checkpoint-") and incomplete_reason(run_dir / n)]
    while run.proc.poll() is None:
        folder = checkpoint_being_written(run_dir, stage, stale)
        if folder is not None and int(folder.rsplit("-", 1)[1]) > after_step:
            run.proc.send_signal(signal.SIGSTOP)
            if checkpoint_being_written(run_dir, stage, stale) == folder:
                run.kill()
                return folder
            run.proc.send_signal(signal.SIGCONT)
    run.finish()
    return None


def kill_in_late_write(run: Run, run_dir, after_step: int) -> str | None:
    """SIGKILL the process after a checkpoint (past ``after_step``) has its trainer_state.json and before its
    completion marker, for certain: a FIFO put where the marker's temporary file goes (``write_json`` opens it for
    writing) holds the process at that open until it is killed. A FIFO placed too late (the marker was already
    being written) is removed and the next checkpoint is tried. Returns the folder, or None (the run ended)."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    stale = [n for n in names if n.startswith("checkpoint-") and incomplete_reason(run_dir / n)]
    tried = set(stale)
    while run.proc.poll() is None:
        folder = checkpoint_being_written(run_dir, "any", tried)
        if folder is None or int(folder.rsplit("-", 1)[1]) <= after_step:
            continue
        tried.add(os.path.basename(folder))
        fifo, marker = os.path.join(folder, COMPLETE_NAME + ".tmp"), os.path.join(folder, COMPLETE_NAME)
        try:
            os.mkfifo(fifo)
        except FileExistsError:  # the marker is being written already
            continue
        while run.proc.poll() is None and not os.path.exists(marker):
            if os.path.exists(os.path.join(folder, "trainer_state.json")):
                run.kill()  # the marker cannot appear: its writer is blocked on the FIFO (or has not reached it)
                os.remove(fifo)  # the resumed run rewrites this folder
                return folder
        os.remove(fifo)  # too late: the marker was written before the FIFO was in place
    run.finish()
    return None


def test_kill_9_at_any_moment_then_resume_is_bitwise_equal(uninterrupted, tiny_llama_dir, pydoc_files):
    tmp, expected = uninterrupted
    recipe = fault_recipe(tmp, tiny_llama_dir, pydoc_files[0], "killed")
    run_dir = tmp / "killed"
    rng = random.Random(0)
    report = []

    def after_kill(what: str, half_written: str | None = None) -> None:
        last = last_complete_checkpoint(str(run_dir))
        if half_written is not None:
            reason = incomplete_reason(half_written)
            assert reason is not None and last != half_written
            what += f" ({os.path.basename(half_written)}: {reason})"
        report.append(f"{what}; resumes from {os.path.basename(last) if last else None}")

    # 1. while checkpoint-4 is being written (the first run has checkpoint-2 to fall back on)
    run = Run(cli(recipe))
    folder = kill_while_writing(run, run_dir, "any", after_step=2)
    assert folder is not None
    after_kill("mid-write", folder)
    # 2. twice at a random moment: a random number of steps into the run, then a random part of a step
    for _ in range(2):
        run = Run(cli(recipe, *RESUME))
        resumed = int(last_complete_checkpoint(str(run_dir)).rsplit("-", 1)[1])
        step, delay = rng.randint(resumed + 1, max(resumed + 1, 13)), rng.uniform(0, 0.05)
        wait_until_step(run, step)
        time.sleep(delay)
        run.kill()
        after_kill(f"random, {delay * 1000:.0f} ms after step {step} was logged")
    # 3. the moment phase 2 starts (its first step, 16, is being taken)
    last = last_complete_checkpoint(str(run_dir))
    assert last is None or int(last.rsplit("-", 1)[1]) < 16
    run = Run(cli(recipe, *RESUME) if last else cli(recipe))
    run.wait_for("step 16 (t=0.667): phase 2")
    run.kill()
    after_kill("phase boundary 16")
    # 4. after trainer_state.json, before the completion marker (a window of about a millisecond, held open)
    run = Run(cli(recipe, *RESUME))
    folder = kill_in_late_write(run, run_dir, after_step=16)
    assert folder is not None, "the run ended without a checkpoint caught between trainer_state.json and its marker"
    after_kill("late write", folder)
    # 5. to the end
    run = Run(cli(recipe, *RESUME))
    assert run.finish() == 0, run.output()[-3000:]
    print("\n".join(["kill -9:", *report, f"max |delta| = {max_delta(final_weights(run_dir), expected)}"]))
    assert len(report) == 5  # every kill happened (`Run.kill` checks each process died of SIGKILL)
    assert_bitwise_equal(final_weights(run_dir), expected)


def wait_until_step(run: Run, step: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while steps_logged(run) < step:
        assert run.proc.poll() is None, f"exited {run.proc.returncode} before step {step}:\n{run.output()[-3000:]}"
        assert time.monotonic() < end, f"no step {step} after {timeout} s"
        time.sleep(0.002)


def steps_logged(run: Run) -> int:
    """Optimizer steps the run had logged (one log line per step, ``'t': step / STEPS``)."""
    ts = [float(m.group(1)) for m in re.finditer(r"'t': '?([0-9.e-]+)", run.output())]
    return round(max(ts, default=0) * STEPS)


def test_sigterm_saves_the_current_step_and_exits_143(uninterrupted, tiny_llama_dir, pydoc_files):
    tmp, expected = uninterrupted
    recipe = fault_recipe(tmp, tiny_llama_dir, pydoc_files[0], "term", save_steps=100)
    run = Run(cli(recipe))
    rng = random.Random(1)
    wait_until_step(run, rng.randint(3, 18))
    time.sleep(rng.uniform(0, 0.05))
    seen = steps_logged(run)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    code = run.finish()
    exit_seconds = time.monotonic() - sent
    out = run.output()
    assert code == 143, out[-3000:]
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1))
    assert seen <= step <= seen + 2 and step < STEPS
    folder = tmp / "term" / f"checkpoint-{step}"
    assert incomplete_reason(str(folder)) is None and read_json(folder / "trainer_state.json")["global_step"] == step
    assert "--training.resume_from_checkpoint true" in out and "Traceback" not in out
    assert not (tmp / "term" / "model.safetensors").exists()  # no final save: the run is not finished
    assert exit_seconds < 30  # Kubernetes' default grace period (and torchrun's before it sends SIGKILL)
    resumed = Run(cli(recipe, *RESUME))
    assert resumed.finish() == 0, resumed.output()[-3000:]
    print(f"SIGTERM at {seen} logged steps: saved step {step}, exit after {exit_seconds:.2f} s")
    assert_bitwise_equal(final_weights(tmp / "term"), expected)


def launch_two_ranks(argv: list[str], started: str = STARTED) -> Run:
    """torchrun with 2 ranks, retried once if the gloo rendezvous fails before training (a loaded machine)."""
    for attempt in (1, 2):
        run = Run(argv)
        try:
            run.wait_for(started)
            return run
        except AssertionError:
            run.finish()
            if attempt == 2 or not any(e in run.output() for e in CONNECTION_ERRORS):
                raise
    raise AssertionError("unreachable")


def rank_pid(torchrun_pid: int, rank: int) -> int:
    for child in open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


def test_sigterm_under_torchrun_stops_both_ranks_at_one_step(uninterrupted, tiny_llama_dir, pydoc_files):
    tmp, _ = uninterrupted
    whole = fault_recipe(tmp, tiny_llama_dir, pydoc_files[0], "ddp-whole", per_device_train_batch_size=2)
    run = launch_two_ranks(torchrun(whole))
    assert run.finish() == 0, run.output()[-3000:]
    expected = final_weights(tmp / "ddp-whole")
    recipe = fault_recipe(tmp, tiny_llama_dir, pydoc_files[0], "ddp", per_device_train_batch_size=2, save_steps=100)
    report, first = [], 0
    # SIGTERM to torchrun (it forwards it to both ranks), then to rank 1 only, then to `accelerate launch` (it runs
    # torch's elastic launcher in its own process, which forwards it): all ranks stop at the same step
    targets = [
        ("torchrun", torchrun(recipe)),
        ("rank 1", torchrun(recipe, *RESUME)),
        ("accelerate launch", accelerate_launch(recipe, *RESUME)),
    ]
    for target, argv in targets:
        run = launch_two_ranks(argv)
        wait_until_step(run, 4 if target == "torchrun" else first + 3)
        pid = rank_pid(run.proc.pid, 1) if target == "rank 1" else run.proc.pid
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        run.finish()
        seconds = time.monotonic() - sent
        out = run.output()
        step = int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1))
        folder = tmp / "ddp" / f"checkpoint-{step}"
        marker = read_json(folder / COMPLETE_NAME)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])  # both ranks saved this step
        assert incomplete_reason(str(folder)) is None and last_complete_checkpoint(str(tmp / "ddp")) == str(folder)
        assert out.count("SIGTERM: stopping after step") == 1 and step < STEPS  # rank 0 logs, for both ranks
        codes = sorted(set(re.findall(r"exitcode *: (-?[0-9]+)", out)))  # what torchrun reports of failed ranks
        assert codes in ([], ["143"]), codes
        assert step > first  # this launch trained (and resumed from the last one's checkpoint)
        report.append(
            f"SIGTERM to {target}: both ranks saved step {step}, exit after {seconds:.2f} s (launcher status "
            f"{run.proc.returncode}, ranks {codes or 'not reported'})"
        )
        first = step
    run = launch_two_ranks(torchrun(recipe, *RESUME))
    assert run.finish() == 0, run.output()[-3000:]
    print("\n".join([*report, f"max |delta| = {max_delta(final_weights(tmp / 'ddp'), expected)}"]))
    assert_bitwise_equal(final_weights(tmp / "ddp"), expected)
