"""The recipe's sections, typed and frozen. :func:`~hf_stackwise.recipe.loader.validate_recipe` parses and checks
each section once and builds these; every consumer reads them and never the raw YAML again.

The mapping-like sections (``model``, ``rack``, ``adapters``, ``data``, ``training``, ``callbacks``) keep the
validated keys as a read-only mapping (``section["key"]``, ``section.get(key)``, ``key in section``, ``{**section}``)
beside their typed fields, so settings that pass straight through to a library (``from_pretrained`` keyword
arguments, ``TrainingArguments`` fields, ``datasets.load_dataset`` arguments) need no second spelling.
:meth:`Recipe.to_dict` gives the JSON-friendly form a run manifest stores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from ..cache.policy import CacheSettings
from ..data.plane import DataPlane
from ..schedule.phases import Schedule

# from_pretrained keyword arguments a recipe may pass through the `model` section
FROM_PRETRAINED_KEYS = (
    "revision",
    "subfolder",
    "trust_remote_code",
    "attn_implementation",
    "gguf_file",
    "local_files_only",
    "cache_dir",
    "low_cpu_mem_usage",
)


@dataclass(frozen=True)
class Section(Mapping):
    """A validated section: its keys as a read-only mapping (subclasses add typed fields)."""

    entries: Mapping = field(default_factory=dict, repr=False)

    def __getitem__(self, key):
        return self.entries[key]

    def __iter__(self) -> Iterator:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict:
        return dict(self.entries)


@dataclass(frozen=True)
class ModelSection(Section):
    """``model:``: what to load and how."""

    name_or_path: str = ""
    dtype: str = "auto"
    quantization: Mapping | None = None  # {bits, quant_type, double_quant, compute_dtype}, or None
    from_scratch: bool = False
    config: Mapping | None = None  # config.json overrides
    from_pretrained: Mapping = field(default_factory=dict)  # FROM_PRETRAINED_KEYS given

    @classmethod
    def parse(cls, values: dict) -> ModelSection:
        return cls(
            entries=values,
            name_or_path=values.get("name_or_path", ""),
            dtype=values.get("dtype", "auto"),
            quantization=values.get("quantization"),
            from_scratch=bool(values.get("from_scratch", False)),
            config=values.get("config"),
            from_pretrained={k: values[k] for k in FROM_PRETRAINED_KEYS if k in values},
        )


@dataclass(frozen=True)
class RackSection(Section):
    """``rack:``: how the block list is cut into stacks."""

    blocks_per_stack: int | None = None
    boundaries: tuple[int, ...] | None = None
    layers: str | None = None  # dotted path of the block list, when auto-detection cannot tell

    @classmethod
    def parse(cls, values: dict) -> RackSection:
        bounds = values.get("boundaries")
        return cls(
            entries=values,
            blocks_per_stack=values.get("blocks_per_stack"),
            boundaries=tuple(bounds) if bounds is not None else None,
            layers=values.get("layers"),
        )


@dataclass(frozen=True)
class DataSection(Section):
    """``data:``: the sources (``datasets.load_dataset`` arguments), the task and its data plane."""

    task: str = "clm"
    plane: DataPlane = field(default_factory=DataPlane)

    @classmethod
    def parse(cls, values: dict) -> DataSection:
        return cls(entries=values, task=values.get("task", "clm"), plane=DataPlane.from_data(values))

    @property
    def mixture(self) -> bool:
        """Named sources mixed per phase (``data.datasets``) rather than one ``train`` set."""
        return bool(self.entries.get("datasets"))

    @property
    def has_eval(self) -> bool:
        return self.entries.get("eval") is not None or bool(self.entries.get("eval_fraction"))


@dataclass(frozen=True)
class TrainingSection(Section):
    """``training:``: ``TrainingArguments`` fields, and where to resume from."""

    output_dir: str = ""
    resume_from_checkpoint: str | bool | None = None

    @classmethod
    def parse(cls, values: dict) -> TrainingSection:
        return cls(
            entries=values,
            output_dir=values.get("output_dir", ""),
            resume_from_checkpoint=values.get("resume_from_checkpoint"),
        )

    @property
    def arguments(self) -> dict:
        """The ``TrainingArguments`` fields (``resume_from_checkpoint`` is the run's, not the arguments')."""
        return {k: v for k, v in self.entries.items() if k != "resume_from_checkpoint"}


@dataclass(frozen=True)
class Recipe:
    """A statically validated recipe: typed, frozen sections. ``raw`` is the YAML as run (overrides applied), kept
    to be written into the run folder; ``schedule`` is parsed (generators expanded; generators over ``all`` once the
    rack is known, see :meth:`for_rack`)."""

    model: ModelSection
    rack: RackSection
    adapters: Section
    data: DataSection
    schedule: Schedule
    training: TrainingSection
    raw: dict = field(repr=False)
    path: str | None = None
    callbacks: Section = field(default_factory=Section)
    cache: CacheSettings = field(default_factory=CacheSettings)

    @property
    def resume_from_checkpoint(self):
        return self.training.resume_from_checkpoint

    def for_rack(self, sizes: tuple[int, ...]) -> Recipe:
        """This recipe with its schedule expanded against the rack's stack sizes (generators over ``all``)."""
        schedule = self.schedule.for_rack(sizes)
        return self if schedule is self.schedule else replace(self, schedule=schedule)

    def to_dict(self) -> dict:
        """The sections as plain JSON values (the schedule as its parsed phases)."""
        return {
            "model": self.model.to_dict(),
            "rack": self.rack.to_dict(),
            "adapters": self.adapters.to_dict(),
            "data": self.data.to_dict(),
            "schedule": self.schedule.to_list(),
            "training": self.training.to_dict(),
            "callbacks": self.callbacks.to_dict(),
            "cache": self.cache.to_dict(),
        }
