"""``StackwiseTrainer``: a ``transformers.Trainer`` that executes a phase schedule over a rack.

How it stays correct:

1. The rack state at step k is a pure function of (schedule, k). ``training_step`` derives the phase
   from ``state.global_step`` and applies it when it differs from the one applied; nothing else is
   remembered, so a resumed run rebuilds exactly the same state.
2. One optimizer over the superset: every parameter that trains in *any* phase has
   ``requires_grad=True`` when the optimizer is built and DDP wraps the model. Phases then flip
   ``requires_grad`` and drop the gradients of frozen parameters; optimizers skip parameters whose
   ``.grad is None``. Parameter groups are per unit (embeddings, stack_i, head) so each phase sets its
   own learning rates through one ``LambdaLR``. Under DDP each transition re-registers the reducer with the
   phase's trainable parameters (``ddp.py``), so gradient buckets hold what trains, not the superset.
3. After every transition the invariant is checked: trainable ⊆ optimized, and parameters frozen in
   the previous phase are unchanged.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import ProgressCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .cache.activations import ActivationCacheMixin
from .data.trainer_mixin import DataPlaneMixin
from .distributed.ddp import ddp_wrapper, find_unused_parameters, register_trainable
from .distributed.sharding import (
    check_sharding,
    gathered,
    is_fsdp2,
    local,
    mixed_precision,
    quantized,
    refresh_mixed_precision,
    reshard,
    sharding_settings,
)
from .export.saving import SavingMixin
from .faults import NONFINITE_POLICIES, FaultTolerance
from .freezing import AutoFreezeMixin
from .metrics import grad_scale, unit_grad_norms
from .optimizers import check_cls_and_kwargs, check_release_idle, check_user_optimizers, release_idle_state
from .persist.checkpoint import (
    RUN_MANIFEST_NAME,
    ResumeError,
    check_output_dir,
    check_resumable,
    resolve_resume,
    run_identity,
    write_json,
)
from .persist.checksum import tensor_checksums
from .persist.weights import remove_model_files
from .rack.adapters import PEFT_PREFIX, attach_adapters, plan_adapters
from .rack.growth import allocate, check_growth, initialize
from .rack.quantization import check_full_blocks_not_quantized, disable_cpu_repack, quantization_identity
from .rack.rack import Rack
from .schedule.phases import RecipeError, ResolvedSchedule, Schedule, phase_defaults, stack_unit

logger = logging.get_logger(__name__)


@dataclass
class StackwiseArguments(TrainingArguments):
    """``TrainingArguments`` plus the schedule and the rack layout; every field is plain JSON."""

    # Parameters that define the schedule
    schedule: list[dict] | None = field(
        default=None,
        metadata={"help": "The phases: a list of mappings with `until`, `train`, `stacks`, `learning_rate`, ..."},
    )
    # Parameters that define the rack
    blocks_per_stack: int | None = field(
        default=None, metadata={"help": "Blocks per stack (stacks of equal size). Default: one block per stack."}
    )
    stack_boundaries: list[int] | None = field(
        default=None, metadata={"help": "Explicit block boundaries of the stacks, e.g. [0, 6, 12, 30]."}
    )
    rack_layers: str | None = field(
        default=None, metadata={"help": "Dotted path of the block list when auto-detection cannot tell."}
    )
    # Parameters that control LoRA
    adapters: dict | None = field(
        default=None,
        metadata={
            "help": "LoRA defaults: r, alpha, dropout, target_modules (default all-linear), trunk_r, trunk_alpha."
        },
    )
    # Parameters that protect the user's results
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow a fresh run into an output directory holding another run (its checkpoints go)."},
    )
    check_invariants: bool = field(
        default=True,
        metadata={"help": "After each transition, check trainable ⊆ optimized and frozen parameters unchanged."},
    )
    nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A step whose loss or gradient norm is non-finite is never applied. `stop`: end the run with an "
            "error naming the step and phase; `skip`: skip such steps (logged as `skipped_steps`), up to "
            "`max_skipped_steps`, then stop."
        },
    )
    max_skipped_steps: int = field(
        default=10, metadata={"help": "With `nonfinite: skip`, how many steps the run may skip before it stops."}
    )
    save_merged: bool = field(
        default=True,
        metadata={
            "help": "Adapter runs: the end of `hf-stackwise train` also writes the merged plain model into output_dir "
            "(as `hf-stackwise export` does; it loads the base in full precision). False: only the trained "
            "tensors, merged later by `hf-stackwise export`. Full-weight runs always save the plain model. Read by "
            "`hf-stackwise train`, not by StackwiseTrainer itself (like `do_train`)."
        },
    )
    # Parameters of the data plane
    data_plane: dict | None = field(
        default=None,
        metadata={
            "help": "The recipe's data settings the training step applies (task, max_seq_length, mask_rate, "
            "mask_split, eval_mask_rate, diffusion_min_rate, diffusion_weighting, datasets). None: rows as given."
        },
    )

    # Parameters transformers has, with a default that depends on the machine
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin batches in page-locked memory. Default: where an accelerator exists (never on CPU)."},
    )

    activation_cache: dict | None = field(
        default=None,
        metadata={"help": "The recipe's `cache:` section: activations (auto|true|false), max_memory, dir."},
    )

    def __post_init__(self):
        if self.dataloader_pin_memory is None:  # torch warns on every dataloader that pins without an accelerator
            self.dataloader_pin_memory = torch.accelerator.is_available()
        super().__post_init__()
        if self.schedule is None:
            self.schedule = [{"name": "all", "until": 1.0, "train": "all"}]
        if isinstance(self.schedule, Schedule):  # parsed from a recipe already: keep its list as written
            self.schedule = self.schedule.raw
        else:
            Schedule.from_list(self.schedule)  # fail early, with key paths
        if self.nonfinite not in NONFINITE_POLICIES or self.max_skipped_steps < 0:
            raise RecipeError(
                f"training.nonfinite: {self.nonfinite!r} / training.max_skipped_steps: {self.max_skipped_steps!r}; "
                "use `stop` or `skip`, and a limit >= 0"
            )
        # ddp_find_unused_parameters: None is decided by StackwiseTrainer from the model (distributed.ddp)


class StackwiseTrainer(FaultTolerance, AutoFreezeMixin, SavingMixin, DataPlaneMixin, ActivationCacheMixin, Trainer):
    """A Trainer that runs ``args.schedule`` over the model's rack; use it like ``Trainer``."""

    def __init__(self, model=None, args: StackwiseArguments | None = None, **kwargs):
        if not isinstance(args, StackwiseArguments):
            raise TypeError("StackwiseTrainer needs `args` to be a StackwiseArguments")
        check_user_optimizers(kwargs.get("optimizers"), kwargs.get("optimizer_cls_and_kwargs"), args)
        schedule = Schedule.from_list(args.schedule, phase_defaults(task_of(args, model)))
        if hasattr(model, "peft_config") and schedule.uses_lora():
            raise ValueError("pass the base model: StackwiseTrainer attaches the LoRA adapters the schedule needs")
        base_rack = Rack.from_model(model, args.rack_layers, args.blocks_per_stack, args.stack_boundaries)
        schedule = schedule.for_rack(base_rack.sizes)  # schedule generators over `all` need the rack's size
        schedule.validate_rack(base_rack.sizes)
        check_sharding(sharding_settings(args), schedule, base_rack.sizes, quantized=quantized(model))
        self.layout = schedule.layout(base_rack.sizes)
        if self.layout.grows:  # every block the run will add exists from now on (the superset rule)
            check_growth(model, base_rack.layers_path, self.layout)
            allocate(model, base_rack.layers_path, self.layout)
        self.adapter_plan: dict[str, dict] = {}
        layers = base_rack.layers_path
        if schedule.uses_lora():
            self.adapter_plan = plan_adapters(schedule, args.adapters, self.layout)
            check_full_blocks_not_quantized(model, base_rack, schedule)
            disable_cpu_repack(model)
            set_seed(args.seed)  # the adapters' random init, before the Trainer seeds: the same in every process
            model = attach_adapters(model, self.adapter_plan, base_rack.layers_path)
            layers = PEFT_PREFIX + base_rack.layers_path
        # DDP's reducer holds each phase's trainable set (distributed.ddp): search for unused parameters only
        # where the model itself may skip some (MoE, layer drop)
        config = getattr(model, "config", None)
        args.ddp_find_unused_parameters = find_unused_parameters(args.ddp_find_unused_parameters, config)
        super().__init__(model=model, args=args, **kwargs)
        if args.fsdp and not self.is_fsdp_enabled:
            logger.warning("training.fsdp: accelerate runs DDP here (no accelerator: `use_cpu`), not sharded")
        self.schedule = schedule
        self._base = base_rack.sizes  # the schedule's view of the model as loaded: blocks per base stack
        self._base_topology = base_rack.topology()
        self.rack = Rack(self.model, layers, self.layout.boundaries)
        self.resolved: ResolvedSchedule | None = (
            self.schedule.resolve(args.max_steps) if args.max_steps and args.max_steps > 0 else None
        )
        self._params = self._collect_parameters()
        self._unit_names = list(self.rack.parameter_units())  # embeddings, stack_i(.lora/.trunk)..., head
        self._ever = self.schedule.ever_trainable_units(self._base)  # the superset, fixed for the run
        grown = {stack_unit(s) for s in range(self.layout.num_base, len(self.layout.sizes))}
        self._saved_units = self._ever | grown  # what adapter-run checkpoints store beside the adapters
        self._phase_blocks: list[int] = []
        self._grad_norms: dict[str, float] = {}
        self._phase_state = None
        self._frozen: list[tuple[str, torch.nn.Parameter]] = []
        self._fingerprints: dict[str, tuple | None] = {}
        self._trainable_count = 0
        self._resume_manifest: dict | None = None
        self._weights_step: int | None = None  # set when the best checkpoint's weights are loaded at the end
        self._init_data_plane()
        self._init_activation_cache()
        self._init_autofreeze()
        self._init_faults()

    # ---- the rack's parameters -------------------------------------------------------------

    def _collect_parameters(self) -> list[tuple[str, torch.nn.Parameter, tuple[str, ...]]]:
        """Each parameter once, with the units that own it (two for tied embeddings)."""
        owners: dict[int, list[str]] = {}
        first: dict[int, tuple[str, torch.nn.Parameter]] = {}
        for unit, params in self.rack.parameter_units().items():
            for name, param in params:
                owners.setdefault(id(param), []).append(unit)
                first.setdefault(id(param), (name, param))
        return [(name, param, tuple(owners[pid])) for pid, (name, param) in first.items()]

    @property
    def num_stacks(self) -> int:
        """Physical stacks: the base model's and every one the schedule grows."""
        return self.rack.num_stacks

    @property
    def base_sizes(self) -> tuple[int, ...]:
        """Blocks per stack of the model as loaded: what the schedule resolves against."""
        return self._base

    # ---- optimizer and scheduler over the superset ------------------------------------------

    def create_optimizer(self, model=None):
        """One optimizer over every parameter that ever trains, grouped by owning units and decay."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        reshard(opt_model)  # FSDP2: a forward before this left unsharded parameters; the optimizer needs the shards
        ever = self._ever
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[tuple[str, ...], bool], list] = {}
        for name, param, owners in self._params:
            in_superset = any(u in ever for u in owners)
            param.requires_grad_(in_superset)
            if in_superset:
                groups.setdefault((owners, name in decay_names), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": 1.0,  # LambdaLR multiplies this by the absolute per-phase learning rate
                "weight_decay": self.args.weight_decay if decay else 0.0,
                "stackwise_units": list(owners),
                "stackwise_decay": decay,
            }
            for (owners, decay), params in groups.items()
        ]
        chosen, where = self.optimizer_cls_and_kwargs, "optimizer_cls_and_kwargs"  # the user's class and kwargs
        if chosen is None:
            chosen = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            where = f"training.optim: {getattr(self.args.optim, 'value', self.args.optim)}"
        optimizer_cls, optimizer_kwargs = check_cls_and_kwargs(chosen, where)
        check_release_idle(self.schedule, optimizer_cls, optimizer_kwargs, where)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """A ``LambdaLR`` whose per-group factor is the absolute learning rate the schedule gives at that step."""
        if self.lr_scheduler is None:
            self._resolve(num_training_steps)
            optimizer = self.optimizer if optimizer is None else optimizer
            self.lr_scheduler = LambdaLR(
                optimizer, [self._group_lr(g["stackwise_units"]) for g in optimizer.param_groups]
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _group_lr(self, units: list[str]):
        base_lr = self.args.learning_rate

        def lr_at(step: int) -> float:
            return max(self.resolved.unit_lr(step, unit, base_lr, self._base) for unit in units)

        return lr_at

    def _resolve(self, total_steps: int) -> None:
        if self.resolved is None or self.resolved.total_steps != total_steps:
            self.resolved = self.schedule.resolve(total_steps)
            self.cache_decisions = None  # the activation cache's decisions depend on the phase lengths
        saved = (self._resume_manifest or {}).get("run", {}).get("total_steps")
        if saved is not None and saved != total_steps:
            raise ResumeError(
                f"training.max_steps: the checkpoint's run has {saved} steps but this run resolves to "
                f"{total_steps}; phase boundaries would move. Restore the original length."
            )

    def _get_learning_rate(self) -> float:
        """The phase's peak learning rate (the Trainer would report param group 0, often a frozen unit)."""
        return max(self.lr_scheduler.get_last_lr())

    # ---- phases -------------------------------------------------------------------------------

    def _apply_phase(self, step: int) -> None:
        """Make the rack match the phase of ``step`` (less what ``autofreeze`` froze by then); a no-op otherwise."""
        state = self._autofreeze(step, self.resolved.state_at(step, self._base))
        applied = self._phase_state
        if applied is not None and state.index == applied.index and state.trainable_units == applied.trainable_units:
            return
        freeze = applied is not None and state.index == applied.index  # an autofreeze decision inside the phase
        fsdp2 = is_fsdp2(self.accelerator)
        if fsdp2:  # transitions act on the sharded parameters (accelerate swapped them in at prepare)
            reshard(self.model)
            if self._phase_state is None:
                self._params = self._collect_parameters()
        verified = self._check_frozen_untouched() if self.args.check_invariants else {}
        trainable_units = state.trainable_units
        phase = self.schedule.phases[state.index]
        if freeze:  # `release_idle` frees the frozen stacks' state; `keep` / `reset` keep it (they act at phase start)
            if phase.optimizer_state == "release_idle":
                release_idle_state(self.optimizer, state.trainable_units)
        elif step == self.resolved.bounds[state.index][0]:  # the phase's first step (not a resume inside it)
            self._grow(state.grown, step)
            if state.grown:
                verified = {}  # growth wrote into blocks that were frozen: checksum them again
            if phase.optimizer_state == "reset":
                self.optimizer.state.clear()
            elif phase.optimizer_state == "release_idle":  # free the state of the units this phase does not train
                release_idle_state(self.optimizer, state.trainable_units)
        self._phase_blocks = self.layout.blocks(state.order)
        self._frozen = []
        self._trainable_count = 0
        for name, param, owners in self._params:
            trainable = any(u in trainable_units for u in owners)
            param.requires_grad_(trainable)
            if trainable:
                self._trainable_count += param.numel()
            else:
                param.grad = None
                self._frozen.append((name, param))
        if ddp_wrapper(self.model_wrapped) is not None:  # DDP's gradient buckets: this phase's parameters only
            register_trainable(self.model_wrapped)
        weight_decay = phase.weight_decay if phase.weight_decay is not None else self.args.weight_decay
        for group in self.optimizer.param_groups:
            group["weight_decay"] = weight_decay if group["stackwise_decay"] else 0.0
        if fsdp2 and mixed_precision(self.accelerator):
            refresh_mixed_precision(self.model)
        self._check_trainable_optimized()
        if self.args.check_invariants:  # still frozen: the checksum just verified; newly frozen: a new one
            new = [(n, p) for n, p in self._frozen if n not in verified]
            fresh = dict(zip((n for n, _ in new), tensor_checksums(local(p) for _, p in new)))
            self._fingerprints = {n: verified[n] if n in verified else fresh[n] for n, _ in self._frozen}
        self._phase_state = state
        self._cache_phase(state)
        self._show_phase_in_progress_bar(state.name + (" (cached)" if self._replay is not None else ""))
        if self.is_world_process_zero():
            grew = "".join(f", grew stack {n.position} ({n.op} of blocks {list(n.sources)})" for n in state.grown)
            logger.info(
                f"[hf_stackwise] step {step} (t={self.resolved.t(step):.3f}): phase {state.index} {state.name!r}"
                f"{grew}, active stacks 0..{state.active_depth - 1}, training {sorted(trainable_units)}, "
                f"{self._trainable_count:,} trainable parameters"
            )

    def _grow(self, grown, step: int) -> None:
        """Initialise, in place, the stacks this phase grows (their parameters already exist)."""
        model, layers = self._base_model(), self._base_topology["layers"]
        blocks = model.get_submodule(layers)
        for new in grown:  # FSDP2: from the full tensors of the new and source blocks, then sharded again
            involved = sorted({*self.layout.stack_blocks(new.stack), *new.sources})
            with gathered(*(blocks[b] for b in involved)):
                initialize(model, layers, self.layout, new, self.args.seed, step)

    def _show_phase_in_progress_bar(self, name: str) -> None:
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if isinstance(callback, ProgressCallback) and bar is not None:
                bar.set_description(f"phase {name}")

    def _check_trainable_optimized(self) -> None:
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        stray = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in optimized]
        if stray:
            raise RuntimeError(
                f"hf_stackwise invariant broken: {len(stray)} trainable parameters are not in the optimizer "
                f"(first: {stray[0]}); they would never update"
            )

    def _check_frozen_untouched(self) -> dict[str, tuple | None]:
        """Compare every parameter frozen in the applied phase with its checksum; returns the checksums."""
        names = [name for name, _ in self._frozen]
        current = dict(zip(names, tensor_checksums(local(p) for _, p in self._frozen)))
        changed = [n for n in names if current[n] != self._fingerprints[n]]
        if changed:
            phase = self._phase_state.name if self._phase_state else "?"
            raise RuntimeError(
                f"hf_stackwise invariant broken: {len(changed)} parameters frozen in phase {phase!r} changed "
                f"(first: {changed[0]})"
            )
        return current

    def producing_blocks(self) -> list[int]:
        """Physical blocks, bottom → top, of the phase that produced the current weights (what eval and export
        run); before the first step, the rack as loaded."""
        step = self.weights_step() - 1
        if self.resolved is None or step < 0:
            if self.resolved is None or self.schedule.phases[0].grow is not None:
                return list(range(self.layout.num_base_blocks))
            step = 0
        return self.layout.blocks(self.resolved.state_at(step, self._base).order)

    def weights_step(self) -> int:
        """The step whose weights the model holds: the global step, or the best checkpoint's once
        ``load_best_model_at_end`` (early stopping) has loaded it."""
        return self.state.global_step if self._weights_step is None else self._weights_step

    def arranged(self):
        """Context in which the model runs as the phase that produced its weights: e.g. ``generate()`` on a
        grown rack inside ``with trainer.arranged():``."""
        return self.rack.arranged(self.producing_blocks())

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._apply_phase(self.state.global_step)
        inputs, replay = self._cache_inputs(inputs)
        with self.rack.arranged(self._phase_blocks, replay):
            loss = super().training_step(model, inputs, num_items_in_batch)
        for _, param in self._frozen:
            param.grad = None
        if self.accelerator.sync_gradients:
            self._autofreeze_observe()
            if self._is_logging_step():
                self._grad_norms = self._unit_grad_norms()
        return loss

    def _is_logging_step(self) -> bool:
        """Whether the step now running ends with a log: the Trainer's rule, with its resolved ``logging_steps``
        (a fraction of the run is an integer in ``state.logging_steps``)."""
        step = self.state.global_step + 1
        if step == 1 and self.args.logging_first_step:
            return True
        steps = self.state.logging_steps
        return self.args.logging_strategy == "steps" and steps > 0 and step % steps == 0

    def _unit_grad_norms(self) -> dict[str, float]:
        """L2 norm of each unit's (synchronized, unclipped, unscaled) gradient; a tied tensor counts for its first
        unit."""
        return unit_grad_norms(self._params, grad_scale(self.accelerator))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._transform_eval_inputs(inputs)
        with self.arranged():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ---- logs ---------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``t``, the phase, the trainable parameter count, each unit's learning rate and gradient norm."""
        if self.resolved is not None and self._phase_state is None:  # eval_on_start: the model of phase 0
            first = self.resolved.state_at(0, self._base)
            logs.update(t=0.0, phase=first.name, phase_index=first.index)
        if self.resolved is not None and self._phase_state is not None:
            step = self.state.global_step
            logs["t"] = round(self.resolved.t(step), 6)
            logs["phase"] = self._phase_state.name
            logs["phase_index"] = self._phase_state.index
            logs["trainable_params"] = self._trainable_count
            if not any(k.startswith("eval_") for k in logs):
                lr_step = max(step - 1, 0)
                for unit in self._unit_names:
                    if unit in self._ever:
                        lr = self.resolved.unit_lr(lr_step, unit, self.args.learning_rate, self._base)
                        logs[f"learning_rate/{unit}"] = lr
                for unit, norm in self._grad_norms.items():
                    logs[f"grad_norm/{unit}"] = norm
                self._grad_norms = {}
                logs.update(self._data_logs(lr_step))
                logs.update(self._cache_logs(logs))
                logs.update(self._autofreeze_logs())
        super().log(logs, start_time)

    # ---- checkpoints, resume and the output directory -----------------------------------------

    def run_identity(self) -> dict:
        total = self.resolved.total_steps if self.resolved is not None else None
        defaults = {"learning_rate": self.args.learning_rate, "weight_decay": self.args.weight_decay}
        if self.args.data_plane:
            defaults["data"] = self.args.data_plane
        if self._quantization():
            defaults["quantization"] = quantization_identity(bnb=self._quantization())
        return run_identity(self.schedule.to_list(), self.base_topology(), total, defaults, self.adapter_plan)

    def _base_model(self):
        return self.model.get_base_model() if self.adapter_plan else self.model

    def _quantization(self) -> dict | None:
        """The base's bitsandbytes config as a plain dict (export re-creates and dequantizes the same base)."""
        config = getattr(self._base_model().config, "quantization_config", None)
        if config is None:
            return None
        return config if isinstance(config, dict) else config.to_dict()

    def base_topology(self) -> dict:
        """Rack topology of the model as loaded (before growth, without PEFT's wrapper prefix)."""
        return dict(self._base_topology)

    def prepare_output_dir(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """Check the output directory and the checkpoint before any training; returns the checkpoint to resume."""
        args = self.args
        resume_from_checkpoint = resolve_resume(args.output_dir, resume_from_checkpoint)
        identity = self.run_identity()
        if resume_from_checkpoint is not None:
            self._resume_manifest = check_resumable(resume_from_checkpoint, identity)
        else:
            check_output_dir(args.output_dir, identity, resuming=False, overwrite=args.overwrite_output_dir)
        self.accelerator.wait_for_everyone()  # every rank has checked the folder before the main one writes into it
        if args.should_save:
            if resume_from_checkpoint is None and args.overwrite_output_dir and os.path.isdir(args.output_dir):
                for name in os.listdir(args.output_dir):
                    if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
                        logger.warning(f"overwrite_output_dir: removing {name} of the previous run")
                        shutil.rmtree(os.path.join(args.output_dir, name))
                remove_model_files(args.output_dir, self.adapter_plan)  # and its final model
            os.makedirs(args.output_dir, exist_ok=True)
            write_json(os.path.join(args.output_dir, RUN_MANIFEST_NAME), identity)
        return resume_from_checkpoint

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run the whole schedule; ``resume_from_checkpoint=True`` takes the last *complete* checkpoint."""
        checkpoint = self.prepare_output_dir(resume_from_checkpoint)
        self._phase_state = None
        self._weights_step = None
        self._cache_begin(resuming=checkpoint is not None)
        try:
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            self._cache_end()
        if self.args.check_invariants and self._phase_state is not None:
            self._check_frozen_untouched()
        return output


def task_of(args: StackwiseArguments, model) -> str | None:
    """The run's task: the data plane's, else ``classification`` for a sequence-classification model."""
    task = (args.data_plane or {}).get("task")
    if task is None and type(model).__name__.endswith("ForSequenceClassification"):
        return "classification"
    return task
