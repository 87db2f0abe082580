"""The recipe reference documents every key the code accepts (and no key it does not)."""

from __future__ import annotations

import pathlib
import re

from hf_stackwise.recipe import ADAPTERS_KEYS, DATA_KEYS, FROM_PRETRAINED_KEYS, MODEL_KEYS, RACK_KEYS, SECTIONS
from hf_stackwise.schedule import PHASE_KEYS

DOC = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()


def section_keys(title: str) -> set[str]:
    body = DOC.split(f"## `{title}`")[1].split("\n## ")[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return {key for row in rows for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


def test_every_section_is_documented():
    assert {s for s in SECTIONS} == set(re.findall(r"^## `([a-z_]+)`", DOC, flags=re.M))


def test_section_tables_match_the_code():
    assert section_keys("model") == set(MODEL_KEYS) | set(FROM_PRETRAINED_KEYS)
    assert section_keys("rack") == set(RACK_KEYS)
    assert section_keys("adapters") == set(ADAPTERS_KEYS)
    assert section_keys("data") == set(DATA_KEYS)
    assert section_keys("schedule") == set(PHASE_KEYS)


def test_training_extras_match_the_arguments_dataclass():
    from dataclasses import fields

    from transformers import TrainingArguments

    from hf_stackwise.trainer import StackwiseArguments

    extra = {f.name for f in fields(StackwiseArguments)} - {f.name for f in fields(TrainingArguments)}
    set_elsewhere = {"schedule", "blocks_per_stack", "stack_boundaries", "rack_layers", "adapters", "data_plane"}
    recipe_level = extra - set_elsewhere
    documented = section_keys("training")
    assert recipe_level <= documented
    assert documented - recipe_level == {"resume_from_checkpoint"}
