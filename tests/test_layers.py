"""The package's import graph: no cycles, layers that only look down, and every DVC stage's
deps covering the project files the stage runs (its import closure)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline import cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"

# The package's rooms, lowest first (docs/design.md): a module imports only from its own room
# and the rooms before it. Rooms on one row are side by side and may not import each other.
ROOMS = [
    ("core",),  # errors, conventions, names, atomic I/O, params sections
    ("models", "world"),  # one file per architecture; the embedded world
    ("config",),  # params.yaml's dataclasses; `models:` against the registry
    ("base",),  # loading and checking base CLIP / SD / vision tower
    ("prompting",),  # grammar, image reading, bridges, PromptEncoder
    ("data",),  # caption sources, pairs, extraction, shards
    ("sampling",),  # each run's encoder; SD sampling
    ("metrics",),  # losses, intervals, retrieval, scores, adherence, significance
    ("reporting", "training"),  # grids, report, compare; the training loop
    ("stages",),  # one module per DVC stage
    ("experiments",),  # ablations and sweeps (may run whole stages)
    ("benchmarks",),  # timing
    ("cli",),  # `deprojector`
]
RANK = {room: rank for rank, rooms in enumerate(ROOMS) for room in rooms}
# Who may import a stage: the CLI, and experiments that run the pipeline end to end.
STAGE_IMPORTERS = ("pipeline.cli", "pipeline.experiments")
CLI_MODULES = ("pipeline.cli", "pipeline.cli.prompts", "pipeline.__main__")


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(module: str, body: list[ast.stmt] | None = None) -> set[str]:
    """Project modules `module` imports anywhere in its file (function bodies included), or
    in `body` when given."""
    tree = body if body is not None else ast.parse(MODULES[module].read_text()).body
    found = set()
    for node in (n for stmt in tree for n in ast.walk(stmt)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.world import scenes` imports the module pipeline.world.scenes
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    for name in list(found):  # importing pipeline.a.b runs pipeline/__init__ and pipeline/a
        parts = name.split(".")
        found |= {".".join(parts[:k]) for k in range(1, len(parts))} & set(MODULES)
    return found - {module}


GRAPH = {module: imports(module) for module in MODULES}


def closure(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += GRAPH[module]
    return seen


def test_the_graph_is_read() -> None:
    # A parser that found nothing would pass every test below.
    assert "pipeline.models.base" in GRAPH["pipeline.models.transformer"]
    assert {"pipeline.prompting.encoder", "pipeline.reporting.drawing"} <= GRAPH[
        "pipeline.stages.render"
    ]
    assert "pipeline.world.scenes" in GRAPH["pipeline.world.embedded"]


def test_no_import_cycles() -> None:
    # Each module's closure, without its package parents, must not lead back to it.
    for module in MODULES:
        reach = closure(GRAPH[module]) - {m for m in MODULES if module.startswith(m + ".")}
        assert module not in reach, f"{module} imports itself through {sorted(reach)}"


def test_every_module_is_in_a_room() -> None:
    loose = [m for m in MODULES if room(m) is None and m not in ("pipeline", "pipeline.__main__")]
    assert not loose, f"modules outside the rooms of docs/design.md: {loose}"
    assert set(RANK) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


@pytest.mark.parametrize("part", sorted(RANK))
def test_rooms_only_look_down(part: str) -> None:
    for module in (m for m in MODULES if room(m) == part):
        for target in GRAPH[module]:
            if target == "pipeline" or room(target) == part:
                continue
            assert room(target) is not None and RANK[room(target)] < RANK[part], (
                f"{module} imports {target}: {part} may import only the rooms before it"
            )


def test_stages_are_imported_only_by_the_cli_and_experiments() -> None:
    for module, targets in GRAPH.items():
        if room(module) != "stages" and not module.startswith(STAGE_IMPORTERS):
            stages = sorted(t for t in targets if room(t) == "stages")
            assert not stages, f"{module} imports {stages}"


def test_a_layer_violation_is_found() -> None:
    """The checks above can fail: core importing a stage would be caught."""
    assert RANK[room("pipeline.stages.render")] > RANK[room("pipeline.core.errors")]
    assert room("pipeline.stages.render") == "stages" and room("pipeline.cli") == "cli"


def test_only_the_cli_imports_the_cli() -> None:
    for module, targets in GRAPH.items():
        if module not in CLI_MODULES:
            assert not targets & set(CLI_MODULES), module


# --- DVC stages ------------------------------------------------------------------------------


def command_roots(command: str) -> set[str]:
    """The project modules `deprojector COMMAND` imports in its function body."""
    function = next(c.callback for c in cli.app.registered_commands if c.name == command)
    source = ast.parse(Path(cli.__file__).read_text())
    definition = next(
        node
        for node in ast.walk(source)
        if isinstance(node, ast.FunctionDef) and node.name == function.__name__
    )
    helpers = {"pipeline.core.errors"}  # `_run` of every command
    if "_params(" in ast.unparse(definition):  # reads the whole params file
        helpers.add("pipeline.config.params")
    return (imports("pipeline.cli", definition.body) | helpers) - set(CLI_MODULES)


def stage_deps() -> dict[str, tuple[str, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        out[name] = (body["cmd"].split()[1], [str(d) for d in body.get("deps", [])])
    return out


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(stage_deps()))
def test_every_file_a_stage_runs_is_among_its_deps(stage: str) -> None:
    command, deps = stage_deps()[stage]
    files = [MODULES[m] for m in closure(command_roots(command))]
    missing = sorted(str(f.relative_to(ROOT)) for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them"
    assert len(files) > 3  # the closure was found


@pytest.mark.parametrize("command", ["captions", "gap", "extract"])
def test_the_clip_only_stages_do_not_run_the_architectures(command: str) -> None:
    """An edit to pipeline/models reruns only the stages that train, load or list runs."""
    assert not {m for m in closure(command_roots(command)) if m.startswith("pipeline.models")}
    assert "pipeline/models" not in stage_deps()[command][1]


def test_a_missing_dep_is_found() -> None:
    """The check above can fail: render without pipeline/reporting/drawing.py misses it."""
    files = [MODULES[m] for m in closure(command_roots("render"))]
    deps = [d for d in stage_deps()["render"][1] if d != "pipeline/reporting/drawing.py"]
    assert any(not covered(f, deps) for f in files)
