"""The GitHub workflows are a thin shell: every `run:` calls a command of this repository (or
dvc / cml) with arguments that parse, so whatever CI runs also runs locally."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from pipeline.cli import app
from pipeline.reporting.compare import DEFAULT_BASELINE

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
OPERATORS = {"&&", "||", ";", "|", "&"}
CML_COMMANDS = {("comment", "create"), ("comment", "update"), ("runner", "launch")}


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `run:` script (lines joined at a trailing backslash, split at
    && || ; | &), each without its leading VAR=value assignments."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in OPERATORS:
                while current and "=" in current[0] and not current[0].startswith("-"):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def run_steps(workflow: Path) -> list[tuple[str, str]]:
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    return [
        (name, step["run"]) for name, job in jobs.items() for step in job["steps"] if "run" in step
    ]


def check_deprojector(args: list[str]) -> None:
    group = typer.main.get_command(app)
    with group.make_context("deprojector", list(args), resilient_parsing=True) as ctx:
        command = group.get_command(ctx, args[0])
        assert command is not None, f"deprojector has no command {args[0]!r}"
        command.make_context(args[0], args[1:])  # raises on an unknown option or argument


def check_dvc(args: list[str]) -> None:
    from dvc.cli import parse_args

    with contextlib.redirect_stderr(io.StringIO()):
        parse_args(args)  # raises DvcParserError on an unknown command or option
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-S", "--set-param"):
            node = params
            for key in value.split("=", 1)[0].split("."):
                assert isinstance(node, dict) and key in node, f"params.yaml has no {value!r}"
                node = node[key]


def check_command(words: list[str]) -> None:
    exe, args = words[0], words[1:]
    if exe in (".", "source"):
        assert args == [".venv/bin/activate"], words
    elif exe == "./setup.sh":
        assert os.access(ROOT / "setup.sh", os.X_OK) and not args
    elif exe == ".venv/bin/python":
        assert args[:2] == ["-m", "pytest"], words
    elif exe in ("dvc", ".venv/bin/dvc"):
        check_dvc(args)
    elif exe in ("deprojector", ".venv/bin/deprojector"):
        check_deprojector(args)
    elif exe == "cml":
        assert tuple(args[:2]) in CML_COMMANDS, words
        files = [a for a in args[2:] if not a.startswith("-")]
        assert all((ROOT / f).suffix == ".md" for f in files), words
    else:
        raise AssertionError(f"{exe!r} is not a command of this repository, dvc or cml")


def test_the_splitter_sees_every_command() -> None:
    script = (
        "A=1 ./setup.sh && . .venv/bin/activate && dvc repro  # comment\ncml comment \\\n"
        "  create --pr x.md; deprojector compare main | cat"
    )
    assert shell_commands(script) == [
        ["./setup.sh"],
        [".", ".venv/bin/activate"],
        ["dvc", "repro"],
        ["cml", "comment", "create", "--pr", "x.md"],
        ["deprojector", "compare", "main"],
        ["cat"],
    ]


@pytest.mark.parametrize(
    "words",
    [
        ["deprojector", "compare", "--no-such-flag"],
        ["deprojector", "retrain"],
        ["dvc", "exp", "run", "-S", "train.no_such_key=1"],
        ["dvc", "reproduce"],
        ["make", "all"],
        ["cml", "send"],
    ],
)
def test_unknown_commands_and_options_are_caught(words: list[str]) -> None:
    from dvc.cli import DvcParserError

    with pytest.raises((typer.TyperException, DvcParserError, AssertionError)):
        check_command(words)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_every_run_step_calls_only_commands_that_exist_here(workflow: Path) -> None:
    steps = run_steps(workflow)
    assert steps
    for job, script in steps:
        for words in shell_commands(script):
            try:
                check_command(words)
            except BaseException as err:
                raise AssertionError(
                    f"{workflow.name} job {job}: {shlex.join(words)}: {err}"
                ) from err


def test_the_pull_request_workflow_tests_reproduces_compares_and_comments() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/compare.yml").read_text())
    assert "pull_request" in workflow.get("on", workflow.get(True))  # YAML 1.1 reads on: as True
    steps = workflow["jobs"]["compare"]["steps"]
    uses = {s["uses"].split("@")[0]: s.get("with", {}) for s in steps if "uses" in s}
    assert uses["actions/checkout"]["fetch-depth"] == 0
    assert str(uses["actions/setup-python"]["python-version"]) == "3.11"
    assert "iterative/setup-cml" in uses

    readme = (ROOT / "README.md").read_text()
    test_command = next(
        line.split("#")[0].strip()
        for line in readme.splitlines()
        if "-m pytest" in line and line.startswith("./setup.sh")
    )
    runs = [s["run"].strip() for s in steps if "run" in s]
    assert runs == [
        test_command,
        ". .venv/bin/activate && dvc repro",
        f".venv/bin/deprojector compare {DEFAULT_BASELINE}",
        "cml comment create --pr reports/compare.md",
    ]
    default_out = typer.main.get_command(app).commands["compare"].params
    assert any(p.name == "out" and str(p.default) == "reports/compare.md" for p in default_out)


def test_the_gpu_variant_launches_a_cml_runner_and_runs_on_it() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/compare-gpu.yml").read_text())
    assert set(workflow.get("on", workflow.get(True))) == {"workflow_dispatch"}
    jobs = workflow["jobs"]
    launch = [
        w
        for _, s in run_steps(ROOT / ".github/workflows/compare-gpu.yml")
        for w in shell_commands(s)
        if w[:3] == ["cml", "runner", "launch"]
    ]
    assert len(launch) == 1 and "--labels=cml-gpu" in launch[0]
    assert jobs["compare-gpu"]["runs-on"] == ["self-hosted", "cml-gpu"]


def test_setup_installs_every_dependency_at_the_version_the_results_were_made_with() -> None:
    """constraints.txt pins each dependency pyproject declares (torch aside: TORCH_SPEC), so a
    fresh clone gets the libraries that wrote the committed bytes; setup.sh applies it."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            assert [s.operator for s in requirement.specifier] == ["=="], line
            pins[canonicalize_name(requirement.name)] = requirement.specifier
    for spec in declared:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in pins  # left to setup.sh's TORCH_SPEC
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        (pin,) = pins[name]
        assert requirement.specifier.contains(pin.version), (spec, pin.version)
    assert "-c constraints.txt" in (ROOT / "setup.sh").read_text()
