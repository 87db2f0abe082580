"""Property-based bad input: malformed mutations of every shipped recipe (wrong types, out-of-range values,
unknown and missing keys, reordered phases, broken YAML) are each refused by `hf-stackwise validate` with exit 2
and one message naming a key of the mutated recipe (or the file), with no traceback and nothing written.

The recipes point at the real offline assets in .cache/ (`make assets`), so the checks that need the model's
config, tokenizer and data run for real."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hf_stackwise.cli import pipeline as run
from hf_stackwise.cli.commands import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))
EXPLORE = bool(os.environ.get("FUZZ_EXPLORE"))  # random (not the reproducible CI) examples, to hunt for new bugs
refused_count = {"examples": 0, "n": 0, "kinds": {}}

# Leaves whose value is free-form for a library (datasets.load_dataset arguments) or where several types are
# valid: a wrong *type* there may be valid, so only the other mutations touch them.
FREE_FORM = ("data_files", "split", "streaming", "name")
# Keys a recipe must have (missing → refused); per phase, `until`.
REQUIRED = [("model",), ("data",), ("schedule",), ("training",), ("model", "name_or_path"), ("training", "output_dir")]
# Fractions, for which a value above 1 is out of range too.
FRACTIONS = {"until", "warmup", "eval_fraction", "mask_rate", "eval_mask_rate", "dropout", "diffusion_min_rate"}
# Numeric leaves for which a negative value is still valid.
NEGATIVE_OK = {("training", "max_steps")}


def generator_seed(path) -> bool:
    """A `cycle`/`sample` entry's seed: any whole number seeds its draws (a negative one too)."""
    return path[0] == "schedule" and len(path) == 4 and path[2] in ("cycle", "sample") and path[3] == "seed"


def load(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    raw["training"]["output_dir"] = "OUTPUT"  # replaced by a per-example temporary folder
    return raw


BASES = {p.relative_to(ROOT).as_posix(): load(p) for p in RECIPES}


def leaves(node, path=()):
    """Every (path, value) of a recipe: mappings, lists and scalars, depth first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, (*path, index))


def key_path(path) -> str:
    """``("schedule", 1, "until")`` → ``schedule[1].until`` (how messages name keys)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def set_at(raw, path, value):
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def wrong_type(value):
    """Values of a type the key does not take (booleans and None are left out: several keys take them)."""
    if isinstance(value, bool):
        return st.sampled_from(["maybe", 3, [True], {"on": 1}])
    if isinstance(value, (int, float)):
        return st.sampled_from(["many", [1, 2], {"n": 1}, "1e-3x"])
    if isinstance(value, str):
        return st.sampled_from([{"x": 1}, [{"x": 1}], 12.5])
    if isinstance(value, list):
        return st.sampled_from([{"x": 1}, 12.5, "not-a-list"])
    return st.sampled_from([[1, 2], 42, "text"])


@st.composite
def mutations(draw):
    """(recipe name, mutated mapping or broken YAML text, kind, key paths a message may name)."""
    name = draw(st.sampled_from(sorted(BASES)))
    raw = copy.deepcopy(BASES[name])
    kind = draw(st.sampled_from(["type", "range", "unknown", "missing", "order", "yaml"]))
    if kind == "type":
        candidates = [
            (p, v)
            for p, v in leaves(raw)
            if p and v is not None and not (p[0] == "data" and any(k in p for k in FREE_FORM))
        ]
        path, value = draw(st.sampled_from(candidates))
        set_at(raw, path, draw(wrong_type(value)))
        return name, raw, kind, [path]
    if kind == "range":
        candidates = [
            (p, v)
            for p, v in leaves(raw)
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            if p not in NEGATIVE_OK and not generator_seed(p)
        ]
        path, value = draw(st.sampled_from(candidates))
        bad = draw(st.sampled_from([-1, -7, -0.5, -1e-3])) if value >= 0 else abs(value) + 1
        if path[-1] in FRACTIONS and draw(st.booleans()):
            bad = draw(st.sampled_from([1.5, 2, 100]))
        set_at(raw, path, bad)
        return name, raw, kind, [path]
    if kind == "unknown":
        candidates = [p for p, v in leaves(raw) if isinstance(v, dict) and not (p and p[-1] == "config")]
        path = draw(st.sampled_from(candidates))
        key = draw(st.sampled_from(["colour", "learning_rat", "trian", "max_step", "blocks"]))
        node = raw
        for part in path:
            node = node[part]
        assume(key not in node)
        node[key] = draw(st.sampled_from([1, "x", [1]]))
        return name, raw, kind, [(*path, key)]
    if kind == "missing":
        phases = [("schedule", i, "until") for i in range(len(raw["schedule"]))]
        path = draw(st.sampled_from(REQUIRED + phases))
        node = raw
        for part in path[:-1]:
            node = node[part]
        blank = draw(st.sampled_from(["delete", None, ""]))  # absent, `key: null` or `key: ""`
        if blank == "delete":
            del node[path[-1]]
        else:
            node[path[-1]] = blank
        return name, raw, kind, [path]
    if kind == "order":
        phases = raw["schedule"]
        assume(len(phases) > 1)
        order = draw(st.permutations(range(len(phases))))
        assume(list(order) != sorted(order))
        raw["schedule"] = [phases[i] for i in order]
        return name, raw, kind, [("schedule", i) for i in range(len(phases))] + [("schedule",)]
    text = yaml.safe_dump(raw, sort_keys=False).splitlines()
    line = draw(st.integers(0, len(text)))
    breakage = draw(st.sampled_from(["  bad: [unclosed", "\tindented: tab", "key: {a: 1", "- : :", "]"]))
    text.insert(line, breakage)
    return name, "\n".join(text) + "\n", kind, []


@pytest.fixture(scope="module", autouse=True)
def in_the_repository():
    """The recipes' paths (.cache/...) are relative to the repository."""
    if not (ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct").is_dir():
        pytest.skip("the shipped recipes need the offline assets: run `make assets`")
    before = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(before)
    if refused_count["examples"]:  # the fuzzing test ran
        assert refused_count["n"] >= 500, refused_count
    print(f"\nfuzz: {refused_count['n']} malformed recipes refused; by kind: {refused_count['kinds']}")


def test_every_shipped_recipe_is_valid_as_the_fuzzer_starts_from_it(tmp_path, capsys):
    for name, raw in BASES.items():
        raw = copy.deepcopy(raw)
        raw["training"]["output_dir"] = str(tmp_path / "out")
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert main(["validate", str(path)]) == 0, (name, capsys.readouterr().err)
        assert not (tmp_path / "out").exists()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(mutation=mutations())
def test_malformed_recipes_are_refused_with_a_key(mutation, tmp_path_factory, capsys, monkeypatch):
    name, raw, kind, paths = mutation
    refused_count["examples"] += 1
    folder = tmp_path_factory.mktemp("fuzz")
    out = folder / "out"
    path = folder / "recipe.yaml"
    if isinstance(raw, str):
        path.write_text(raw.replace("OUTPUT", str(out)))
    else:
        text = yaml.safe_dump(raw, sort_keys=False)
        path.write_text(text.replace("OUTPUT", str(out)))

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    monkeypatch.setattr(run, "load_model", refuse)
    capsys.readouterr()
    code = main(["validate", str(path)])  # any exception but the CLI's own refusal fails here, with its traceback
    err = capsys.readouterr().err
    assert code == 2, f"{name}: {kind} mutation at {[key_path(p) for p in paths]} was accepted"
    assert err.startswith("hf-stackwise: error: ") and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 or (" problems in the recipe:" in lines[0] and all(x.startswith("  - ") for x in lines[1:]))
    names = [str(path)] if kind == "yaml" else []
    for p in paths:  # the key, or a section above it, down to `section.key`
        names += [key_path(p[:n]) for n in range(min(2, len(p)), len(p) + 1)]
    assert any(n in err for n in names), f"{name}: {kind} at {names}: message names none of them: {err}"
    assert not out.exists(), f"{name}: {kind}: {out} was created"
    refused_count["n"] += 1
    if os.environ.get("FUZZ_LOG"):
        with open(os.environ["FUZZ_LOG"], "a") as log:
            log.write(f"{kind} {[key_path(p) for p in paths]} -> {err.strip()[21:200]}\n")
    refused_count["kinds"][kind] = refused_count["kinds"].get(kind, 0) + 1
