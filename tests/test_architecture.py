"""The package's structure explains itself: no import cycle, and each subpackage imports only the packages its
``__init__`` docstring allows (``May import: ...``)."""

import ast
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_stackwise")


def module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def import_graph() -> dict[str, set[str]]:
    """Module → the hf_stackwise modules it imports (also inside functions), relative imports resolved."""
    graph = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            module = module_name(path)
            package = module.split(".") if file == "__init__.py" and module != "__init__" else module.split(".")[:-1]
            edges = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package[: len(package) - (node.level - 1)]
                    if node.module:
                        edges.add(".".join([*base, node.module]))
                    else:
                        edges |= {".".join([*base, alias.name]) for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_stackwise."):
                    edges.add(node.module[len("hf_stackwise.") :])
            graph[module] = edges
    modules = set(graph)
    # `from ..data import classification` names a module; `from .phases import Schedule` names one too
    return {m: {e for e in edges if e in modules} for m, edges in graph.items()}


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if state.get(module) is None:
            state[module] = "open"
            for dep in sorted(graph[module]):
                visit(dep, [*path, module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "trainer" not in graph["export.folder"] and "export.folder" in graph["export.hub"]


def allowed_imports(package: str) -> set[str] | None:
    """The packages a subpackage's docstring allows; None for "anything"."""
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, package, "__init__.py")).read())) or ""
    match = re.search(r"May import: ([^.;]+)", doc)
    assert match, f"hf_stackwise/{package}/__init__.py: the docstring says what it may import (`May import: ...`)"
    if match.group(1).strip().startswith("anything"):
        return None
    return {name.strip() for name in match.group(1).split(",")}


def subpackages() -> list[str]:
    return sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))


def test_each_subpackage_imports_only_what_its_docstring_allows():
    graph = import_graph()
    packages = subpackages()
    assert len(packages) >= 8
    for package in packages:
        allowed = allowed_imports(package)
        for module, edges in graph.items():
            if module.split(".")[0] != package:
                continue
            for dep in edges:
                top = dep.split(".")[0]
                if top == package or allowed is None:
                    continue
                assert top in allowed, f"{module} imports {dep}; hf_stackwise/{package} may import {sorted(allowed)}"


def test_nothing_imports_the_cli_and_the_top_level_stays_small():
    graph = import_graph()
    for module, edges in graph.items():
        if module.split(".")[0] not in ("cli", "__main__"):
            assert not any(dep.split(".")[0] == "cli" for dep in edges), f"{module} imports the CLI"
    top_level = [name for name in os.listdir(ROOT) if name.endswith(".py")]
    assert len(top_level) <= 10, top_level
    assert graph["errors"] == set() and graph["metrics"] == set()


def test_each_recipe_section_is_parsed_once_per_load_and_prepare(tmp_path, monkeypatch, tiny_llama_dir, pydoc_files):
    """`load_recipe` + `prepare` parse every section once: the typed sections travel down the pipeline."""
    from conftest import tiny_recipe, write_recipe

    from hf_stackwise.cache.policy import CacheSettings
    from hf_stackwise.cli import pipeline
    from hf_stackwise.data.plane import DataPlane
    from hf_stackwise.recipe import callbacks, loader, sections
    from hf_stackwise.schedule.phases import Schedule

    calls: dict[str, int] = {}

    def counting(owner, name, key, wrap=classmethod):
        original = getattr(owner, name)
        function = original.__func__ if wrap is classmethod else original

        def counted(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return function(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrap(counted) if wrap is classmethod else counted)

    counting(Schedule, "from_list", "schedule")
    counting(Schedule, "resolve", "boundaries", wrap=None)
    counting(DataPlane, "from_data", "data")
    counting(CacheSettings, "from_dict", "cache")
    counting(sections.ModelSection, "parse", "model")
    counting(sections.RackSection, "parse", "rack")
    counting(sections.TrainingSection, "parse", "training")
    monkeypatch.setattr(loader, "check_callbacks", _counted(callbacks.check_callbacks, calls, "callbacks"))
    monkeypatch.setattr(pipeline, "load_config", _counted(pipeline.load_config, calls, "config"))

    schedule = [{"name": "top", "until": 0.5, "train": ["top"]}, {"name": "all", "until": 1.0, "train": "all"}]
    raw = tiny_recipe(tmp_path, tiny_llama_dir, pydoc_files[0], schedule, max_steps=4)
    raw["cache"] = {"activations": "auto"}
    recipe = loader.load_recipe(write_recipe(tmp_path, raw))
    pipeline.prepare(recipe)
    expected = ("schedule", "boundaries", "data", "cache", "model", "rack", "training", "callbacks", "config")
    assert calls == dict.fromkeys(expected, 1)


def _counted(function, calls: dict, key: str):
    def counted(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return function(*args, **kwargs)

    return counted
