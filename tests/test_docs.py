"""README.md and docs/: what a user would paste works, and what a reader would follow exists.

- every markdown link to a local file resolves (and its #anchor names a heading there);
- every `deprojector SUB ...` line of a bash/sh/console block parses with the real typer app
  (not run), as do `accelerate launch ... -m pipeline SUB ...` and `torchrun ... -m pipeline`;
- every `python -m MODULE` names an importable module;
- every `dvc ...` line parses with dvc's own parser, and every `-S key=value` names a key of
  params.yaml (`+key` adds under an existing parent, `~key` removes an existing key or a run);
- YAML blocks parse and name registered architectures; Python blocks compile, and a
  `PromptEncoder.from_pretrained` example is the README's, which
  tests/test_prompt_encoder.py::test_readme_python_example_runs_outside_the_repository runs,
  or the model card's snippet, which tests/test_hub.py runs.

Commands are parsed, never run: the whole file takes a second or two.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|", "&"}
DEPROJECTOR = {"deprojector", ".venv/bin/deprojector"}
PYTHON = {"python", "python3", ".venv/bin/python"}
DVC = {"dvc", ".venv/bin/dvc"}
# Commands that appear in the docs but are not this project's to parse: checked by name only.
NOT_PARSED = {
    "./setup.sh",  # the tests' own subject (tests/test_ci_workflows.py)
    ".",
    "source",  # `. .venv/bin/activate`
    "hf",  # huggingface_hub's downloader (network)
    "cml",  # CML on GitHub (tests/test_ci_workflows.py checks the workflows' cml lines)
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first line inside the fence
    language: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line + offset}"


def code_blocks(path: Path, text: str | None = None) -> list[Block]:
    lines = (path.read_text() if text is None else text).splitlines()
    blocks, fence, start, language = [], None, 0, ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, start, language = line[: len(line) - len(line.lstrip())], number, stripped[3:]
        elif fence is not None and stripped == "```":
            body = [
                raw[len(fence) :] if raw.startswith(fence) else raw
                for raw in lines[start : number - 1]
            ]
            blocks.append(Block(path, start + 1, language.strip().lower(), "\n".join(body)))
            fence = None
    assert fence is None, f"{path.relative_to(ROOT)}:{start}: a code block is never closed"
    return blocks


def outside_code_blocks(text: str) -> str:
    return re.sub(r"^\s*```.*?^\s*```[ \t]*$", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside code blocks and inline code spans (where links are links)."""
    return re.sub(r"`[^`]*`", "", outside_code_blocks(text))


# ---------------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    for line in outside_code_blocks(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = found.get(base, 0)
            found[base] = count + 1
            if count:
                found[f"{base}-{count}"] = 1
    return set(found)


def link_problems(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    problems = []
    for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: link {target!r}"
        if not resolved.exists():
            problems.append(f"{where}: no such file {resolved.relative_to(ROOT)}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: {resolved.relative_to(ROOT)} has no heading #{anchor}")
    return problems


# ------------------------------------------------------------------------------- commands


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """(line offset, logical line): continuation backslashes joined, `$ ` prompts of console
    blocks dropped, comment-only and empty lines left out."""
    logical, current, first = [], "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw[2:] if block.language == "console" and raw.startswith("$ ") else raw
        if not current:
            first = offset
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            logical.append((first, current))
        current = ""
    return logical


def simple_commands(line: str, variables: dict[str, str]) -> list[list[str]]:
    """The simple commands of one shell line (split at && || ; | &), comments dropped, $VAR of
    the block's own assignments expanded, leading VAR=value assignments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in [*lexer, ";"]:
        if token in OPERATORS:
            while current and re.match(r"[A-Za-z_]\w*=", current[0]):
                name, value = current.pop(0).split("=", 1)
                if not current:  # an assignment on its own: remembered for the block
                    variables[name] = value
            if current:
                commands.append(current)
            current = []
        elif re.fullmatch(r"\$\{?([A-Za-z_]\w*)\}?", token):
            name = token.strip("${}")
            assert name in variables, f"${name} is not set in this block"
            current.extend(shlex.split(variables[name]))
        else:
            assert "$" not in token and "`" not in token, (
                f"shell expansion in {token!r}: not parsed here (write the command out)"
            )
            current.append(token)
    return commands


def check_deprojector(args: list[str]) -> None:
    assert args, "deprojector without a command"
    group = typer.main.get_command(app)
    name, rest = args[0], args[1:]
    assert name in group.commands, (
        f"deprojector has no command {name!r} (it has {', '.join(sorted(group.commands))})"
    )
    command = group.commands[name]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            command.make_context(name, list(rest), resilient_parsing=False)
    except typer.Exit:  # --help
        pass
    except typer.TyperException as err:  # typer's click: usage errors, missing arguments
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise AssertionError(f"deprojector {name}: {message}") from None


def params_has(key: str) -> bool:
    node = yaml.safe_load((ROOT / "params.yaml").read_text())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_set_param(value: str) -> None:
    key = value.split("=", 1)[0]
    if key.startswith("+"):  # add a key: its parent must exist (models.NEWNAME={...})
        parent = key[1:].rsplit(".", 1)[0]
        assert "." in key and params_has(parent), f"-S {value!r}: params.yaml has no {parent!r}"
    elif key.startswith("~"):  # remove a key, or a run of models: (NAME a placeholder)
        assert key.startswith("~models.") or params_has(key[1:]), (
            f"-S {value!r}: params.yaml has no {key[1:]!r}"
        )
    else:
        assert params_has(key), f"-S {value!r}: params.yaml has no {key!r}"


def check_dvc(args: list[str]) -> None:
    from dvc.cli import DvcParserError, parse_args

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_args(args)
    except DvcParserError as err:
        raise AssertionError(f"dvc {shlex.join(args)}: dvc's parser refuses it") from err
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-S", "--set-param"):
            check_set_param(value)


def check_module(module: str) -> None:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    assert spec is not None, f"python -m {module}: no such module"


def check_command(words: list[str]) -> None:
    exe, args = words[0], words[1:]
    if exe in DEPROJECTOR:
        check_deprojector(args)
    elif exe in DVC:
        check_dvc(args)
    elif exe in PYTHON or exe in ("accelerate", "torchrun"):
        assert "-m" in args, f"{exe} without -m MODULE: not a command the docs should show"
        module = args[args.index("-m") + 1]
        check_module(module)
        if module == "pipeline":  # `python -m pipeline SUB` is the deprojector CLI
            check_deprojector(args[args.index("-m") + 2 :])
    else:
        assert exe in NOT_PARSED, (
            f"{exe!r}: a command test_docs.py knows nothing about "
            f"(parse it here, or add it to NOT_PARSED)"
        )


def command_problems(block: Block) -> list[str]:
    problems, variables = [], {}
    for offset, line in shell_lines(block):
        try:
            for words in simple_commands(line, variables):
                check_command(words)
        except (AssertionError, ValueError) as err:  # ValueError: shlex (an open quote)
            problems.append(f"{block.where(offset)}: {line.strip()}\n    {err}")
    return problems


# ------------------------------------------------------------------------- other blocks


def registered_architectures() -> set[str]:
    """`model_type = "..."` of pipeline/models/ (read, not imported: importing needs torch)."""
    return {
        name
        for path in (ROOT / "pipeline" / "models").glob("*.py")
        for name in re.findall(r"^\s+model_type = \"([\w-]+)\"", path.read_text(), re.M)
    }


def readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    return next(
        block.split("```")[0]
        for block in readme.split("```python\n")[1:]
        if "PromptEncoder.from_pretrained" in block
    )


def card_snippet(text: str) -> str:
    """The model card's snippet (pipeline.models.card.usage_snippet) for the deprojector and
    the Stable Diffusion `text` names; tests/test_hub.py runs a trained folder's."""
    from pipeline.models.card import usage_snippet

    model = re.search(r'PromptEncoder\.from_pretrained\("([^"]+)"\)', text)
    sd = re.search(r'StableDiffusionPipeline\.from_pretrained\("([^"]+)"\)', text)
    return usage_snippet(model.group(1) if model else "", sd.group(1) if sd else "builtin")


def block_problems(block: Block) -> list[str]:
    if block.language in SHELL_LANGUAGES:
        return command_problems(block)
    if block.language == "yaml":
        try:
            data = yaml.safe_load(block.text)
        except yaml.YAMLError as err:
            return [f"{block.where()}: not valid YAML: {err}"]
        runs = (data or {}).get("models", {}) if isinstance(data, dict) else {}
        known = registered_architectures()
        return [
            f"{block.where()}: models.{name}: unknown type {spec.get('type')!r}"
            for name, spec in runs.items()
            if isinstance(spec, dict) and spec.get("type") not in known
        ]
    if block.language == "python":
        if "PromptEncoder.from_pretrained" in block.text and block.text.strip() not in (
            readme_python_example().strip(),
            card_snippet(block.text).strip(),
        ):
            return [
                f"{block.where()}: differs from the README's Python example, the one "
                "tests/test_prompt_encoder.py runs, and from the model card's snippet "
                "(pipeline.models.card.usage_snippet, run by tests/test_hub.py)"
            ]
        try:
            ast.parse(block.text)
        except SyntaxError as err:
            return [f"{block.where((err.lineno or 1) - 1)}: not valid Python: {err.msg}"]
    return []


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_links_point_at_files_that_exist(path: Path) -> None:
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_code_blocks_parse(path: Path) -> None:
    problems = [p for block in code_blocks(path) for p in block_problems(block)]
    assert not problems, "\n".join(problems)


def test_docs_the_commands_checked_are_the_ones_shown() -> None:
    """The checker sees the README's and the manual's commands (not an empty list)."""
    seen: dict[str, int] = {}
    for path in DOCS:
        for block in code_blocks(path):
            if block.language in SHELL_LANGUAGES:
                for _, line in shell_lines(block):
                    for words in simple_commands(line, {"M": "-m models/x"}):
                        seen[words[0]] = seen.get(words[0], 0) + 1
    assert seen.get("deprojector", 0) >= 20 and seen.get("dvc", 0) >= 10, seen
    assert seen.get("python", 0) >= 5, seen
    readme = code_blocks(ROOT / "README.md")
    assert readme[0].language == "bash" and readme[0].line == 2  # the two commands come first
    assert any("PromptEncoder.from_pretrained" in b.text for b in readme if b.language == "python")


def test_docs_spec_is_in_the_repository() -> None:
    for path in DOCS:
        assert "shared/SPEC.md" not in path.read_text(), (
            f"{path.relative_to(ROOT)} points outside the repository; use docs/spec.md"
        )


def test_docs_every_record_is_listed() -> None:
    records = ROOT / "docs" / "records"
    listed = (records / "README.md").read_text()
    missing = [p.name for p in sorted(records.glob("*.json")) if f"]({p.name})" not in listed]
    assert not missing, f"docs/records/README.md does not describe {missing}"


PLANTED = [
    ("deprojector encode 'red circle' --no-such-option -o x.safetensors", "no-such-option"),
    ("deprojector retrain transformer", "no command 'retrain'"),
    (".venv/bin/deprojector generate 'x' --model m \\\n  --stepz 3", "stepz"),
    ("deprojector compare main && deprojector train", "Missing argument"),
    ("dvc exp run -S train.no_such_key=1", "no 'train.no_such_key'"),
    ("dvc exp run -S '+nosection.x=1'", "no 'nosection'"),
    ("dvc exp reproduce", "dvc's parser"),
    ("python -m pipeline.no_such_module --help", "no such module"),
    ("torchrun --nproc_per_node 2 -m pipeline trian x", "no command 'trian'"),
    ("make all", "knows nothing"),
    ("deprojector generate $UNSET", "not set"),
]


@pytest.mark.parametrize(("line", "message"), PLANTED, ids=[p[0][:40] for p in PLANTED])
def test_docs_checker_catches_a_planted_bad_line(line: str, message: str) -> None:
    block = Block(ROOT / "docs" / "planted.md", 10, "bash", f"# a comment\n{line}\n")
    problems = command_problems(block)
    assert len(problems) == 1 and message in problems[0], problems
    assert problems[0].startswith("docs/planted.md:11:")  # names the file and the line


def test_docs_checker_accepts_what_the_docs_write() -> None:
    good = (
        'M="--model models/vicinity-batch"\n'
        'deprojector generate "red circle" $M -o a.png   # a comment\n'
        "deprojector encode 'cat, maid' -m models/t --no-combine -o x.safetensors\n"
        "deprojector bench --help\n"
        "dvc exp run -S '+models.vb2={type: vicinity-batch, vicinity: 2}' -S '~models.vb2'\n"
        "dvc exp show ; dvc params diff\n"
        "python -m pipeline.experiments.world_recipes --world \\\n  --out x.json\n"
        "accelerate launch --num_processes 4 -m pipeline train transformer\n"
    )
    assert command_problems(Block(ROOT / "docs" / "good.md", 1, "bash", good)) == []


def test_docs_link_checker_catches_a_missing_file_and_anchor(tmp_path: Path) -> None:
    page = ROOT / "docs" / "planted.md"  # never written: its text is passed in
    text = (
        "See [usage](usage.md), [gone](gone.md), [grid](../reports/grid_single.png),\n"
        "[a heading](world.md#no-such-heading), [ok](world.md#how-world-v2-was-found),\n"
        "`[not a link](nowhere.md)` and [web](https://example.com/x.md).\n"
    )
    problems = link_problems(page, text)
    assert len(problems) == 2, problems
    assert "gone.md" in problems[0] and "#no-such-heading" in problems[1]


def test_docs_python_and_yaml_blocks_are_checked() -> None:
    bad_python = Block(ROOT / "docs" / "p.md", 3, "python", "x = (\n")
    assert block_problems(bad_python)
    bad_yaml = Block(ROOT / "docs" / "p.md", 3, "yaml", "models:\n  x: {type: vicinity-bach}\n")
    assert "vicinity-bach" in block_problems(bad_yaml)[0]
    copied = Block(
        ROOT / "docs" / "p.md", 3, "python", readme_python_example().replace("seed(0)", "seed(1)")
    )
    assert "differs from the README" in block_problems(copied)[0]


@pytest.mark.parametrize("report", ["reports/report.md", "study/reports/report.md"])
def test_results_md_shows_each_reports_one_table_as_rendered(report: str) -> None:
    """docs/results.md copies the "In one table" of the default run's and the study's
    generated reports: each copy is the report's table as `render` last wrote it."""
    text = (ROOT / report).read_text()
    start = text.index("| row | AR cosine (mask)")
    table = text[start : text.index("\n\n", start)]
    assert table in (ROOT / "docs" / "results.md").read_text(), report
