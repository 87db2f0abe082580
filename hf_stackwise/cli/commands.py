"""Command line: ``hf-stackwise train RECIPE [--section.key value ...]`` and ``hf-stackwise validate RECIPE``.

Thin by design: parse, call :mod:`hf_stackwise.cli.pipeline`, print. Recipe problems print as one readable
paragraph and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from ..schedule.phases import RecipeError, StackwiseError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-stackwise",
        description="Progressive, time-scheduled training for Hugging Face models, inside one Trainer run.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "run a recipe: validate it, train through every phase, save the model to training.output_dir"),
        ("validate", "check a recipe against the model's config and the data, print its phases; load no weights"),
    ):
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="Override any recipe key after the recipe: --training.max_steps 100 --schedule.0.until 0.4",
        )
        cmd.add_argument("recipe", help="path of the YAML recipe")
        cmd.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs")
    help_text = (
        "print each phase (steps, t, active and trainable stacks, parameters, mode, learning rate, data) and a "
        "memory estimate per phase; reads the model's config only, loads no weights, writes nothing"
    )
    cmd = sub.add_parser(
        "plan",
        help=help_text,
        description=help_text,
        epilog="Override any recipe key after the recipe: --training.per_device_train_batch_size 4",
    )
    cmd.add_argument("recipe", help="path of the YAML recipe")
    cmd.add_argument("--plot", metavar="PNG", help="also draw the schedule's timeline into this PNG file")
    cmd.add_argument(
        "--world-size",
        metavar="N",
        help="also print the memory per rank on N ranks (all nodes together) under DDP and under FSDP2",
    )
    cmd.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs")
    help_text = (
        "write a run (its final model, else its last complete checkpoint) or a checkpoint as a plain model folder"
    )
    cmd = sub.add_parser("export", help=help_text, description=help_text + "; inactive stacks are dropped")
    cmd.add_argument("source", help="a run's training.output_dir or one of its checkpoint-N folders")
    cmd.add_argument("output_dir", help="folder to write; must be empty unless --overwrite")
    cmd.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    cmd.add_argument(
        "--adapters", action="store_true", help="write the PEFT adapter folders and a rack manifest instead of a merge"
    )
    help_text = "write schedule.png (the phases over t) and loss.png (loss coloured by phase) for a run"
    cmd = sub.add_parser("plot", help=help_text, description=help_text)
    cmd.add_argument("run_dir", help="a run's training.output_dir")
    cmd.add_argument("--out", help="folder for the PNGs (default: the run folder)")
    return parser


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _print_phases(trace, total_steps: int, stopped_at: int | None = None) -> None:
    """One line per phase with its resolved steps and t range; with ``stopped_at`` (a run that ended before
    ``total_steps``, e.g. early stopping), which phases ran, where the run stopped, and which never started."""
    bounds = [start for start, _, _ in trace] + [total_steps]
    for (start, name, stacks), end in zip(trace, bounds[1:]):
        line = (
            f"  {name:<16} steps {start:>6}-{end - 1:<6} t {start / total_steps:.2f}-{end / total_steps:.2f}  "
            f"train stacks {list(stacks)}"
        )
        if stopped_at is not None and stopped_at <= start:
            line += "  (not reached)"
        elif stopped_at is not None and stopped_at < end:
            line += f"  (stopped after step {stopped_at - 1}, t {stopped_at / total_steps:.2f})"
        print(line)
    if stopped_at is not None:
        print(f"stopped early: {stopped_at} of {total_steps} steps ran (t {stopped_at / total_steps:.2f})")


def _world_size(value: str | None) -> int:
    if value is None:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise RecipeError(f"plan --world-size: {value!r}; give the number of ranks, e.g. --world-size 8")
    return int(value)


def _pop_option(items: list[str], option: str) -> tuple[list[str], str | None]:
    """Take ``option VALUE`` (or ``option=VALUE``) out of a list of overrides."""
    rest, value, i = [], None, 0
    while i < len(items):
        if items[i] == option and i + 1 < len(items):
            value, i = items[i + 1], i + 2
            continue
        if items[i].startswith(option + "="):
            value = items[i].split("=", 1)[1]
        else:
            rest.append(items[i])
        i += 1
    return rest, value


def _end_distributed() -> None:
    # A clean exit for torchrun / accelerate launch (without it, processes rarely abort at exit).
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _preempted(recipe: str, overrides: list[str], summary: dict) -> int:
    """SIGTERM stopped the run after a checkpoint: say where, and how to continue."""
    from ..faults import PREEMPTED_EXIT_CODE

    if _is_main_process():
        step = summary["preempted_at"]
        overrides, _ = _pop_option(overrides, "--training.resume_from_checkpoint")
        again = ["hf-stackwise", "train", recipe, *overrides, "--training.resume_from_checkpoint", "true"]
        print(
            f"hf-stackwise: stopped by SIGTERM after step {step}; {summary['output_dir']}/checkpoint-{step} holds "
            f"it. Continue the run with: {shlex.join(again)}"
        )
    return PREEMPTED_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("hf_stackwise").setLevel(logging.INFO)
    try:
        if args.command == "plot":
            from ..report.plots import plot_run

            print("hf-stackwise: wrote " + ", ".join(plot_run(args.run_dir, args.out)))
            return 0
        if args.command == "export":
            from ..export.folder import export

            used = export(args.source, args.output_dir, overwrite=args.overwrite, adapters=args.adapters)
            print(f"hf-stackwise: exported {used} to {args.output_dir}")
            return 0
        from ..recipe.loader import load_recipe
        from . import pipeline as run

        if args.command == "plan":  # `--plot` may also come after the overrides
            args.overrides, plot = _pop_option(args.overrides, "--plot")
            args.plot = plot or args.plot
            args.overrides, world = _pop_option(args.overrides, "--world-size")
            args.world_size = _world_size(world or args.world_size)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "plan":
            from .plan import format_plan, make_plan

            plan = make_plan(recipe)
            print(format_plan(plan))
            if recipe.data.get("task") in ("dpo", "kto"):  # the reference's memory per phase, each way
                from .preference import format_reference

                print("\n" + format_reference(plan, recipe, run.load_config(recipe)))
            if args.world_size > 1:
                from .plan_memory import format_per_rank

                print(format_per_rank(plan, args.world_size, recipe.training))
            if args.plot:
                from ..report.plots import plot_timeline

                path = plot_timeline(plan.schedule, plan.base_sizes, args.plot, plan.base_lr, plan.total_steps)
                print(f"hf-stackwise: wrote {path}")
            return 0
        if args.command == "validate":
            prepared = run.prepare(recipe)
            resolved = prepared.resolved
            stacks = len(prepared.rack["boundaries"]) - 1
            print(
                f"{args.recipe}: valid. {stacks} stacks over {prepared.rack['num_blocks']} blocks "
                f"({prepared.rack['layers']}), {prepared.total_steps} steps:"
            )
            _print_phases(resolved.trace(stacks), prepared.total_steps)
            return 0
        summary = run.train(recipe)
    except StackwiseError as err:
        print(f"hf-stackwise: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.command == "train":  # mid-training I/O errors keep their traceback
            raise
        print(f"hf-stackwise: error: {args.command}: {err}", file=sys.stderr)
        return 2
    finally:
        _end_distributed()
    if summary.get("preempted_at") is not None:
        return _preempted(args.recipe, args.overrides, summary)
    if _is_main_process():
        total = summary.get("total_steps") or summary["global_step"]
        stopped = summary["global_step"] if summary["global_step"] < total else None
        _print_phases(summary["trace"], total, stopped)
        if summary["eval_loss_first"] is not None:
            print(f"eval loss: first {summary['eval_loss_first']:.4f} -> last {summary['eval_loss_last']:.4f}")
        if summary.get("hub_model_id"):
            print(f"hf-stackwise: pushed the export ({summary['output_dir']}/_export) to {summary['hub_model_id']}")
        print(f"hf-stackwise: trained {summary['global_step']} steps; " + _where_to_load(summary))
    return 0


def _where_to_load(summary: dict) -> str:
    """The last line of `train`: the folder that loads as the trained model."""
    if summary.get("model_dir"):
        return f'load the model with {summary["model_class"]}.from_pretrained("{summary["model_dir"]}")'
    return (
        f"{summary['output_dir']} holds the trained adapters, not a merged model (training.save_merged: false); "
        f"merge them with `hf-stackwise export {summary['output_dir']} OUT`"
    )
