"""`deprojector compare`: grids, params and metrics of several revisions in one markdown report.

Reads committed results only (it never runs a stage): each revision's grids, `params.yaml`
and evaluate records (`reports/metrics/*.json`) come from git (they are committed, `cache:
false`). One table holds the params that differ between the revisions, one the headline of
each (pipeline/metrics/headline.py, read from its records, so a revision from before
reports/headline.json existed is shown too), a column per revision and each later value's
difference to the first. A revision is a git revision (branch, tag,
commit, `HEAD~1`), the name of a `dvc exp run` experiment (a git ref
`refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`), a branch that exists only as `origin/NAME`
(a CI checkout has no local `main`), or `workspace` (the files on disk). The report and its
images are CI artefacts, not stage outputs, and are git-ignored.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.atomic import write_bytes, write_text
from pipeline.core.errors import DeprojectorError
from pipeline.core.names import NULL_BASELINE, RETRIEVAL
from pipeline.metrics.headline import Headline, headline

WORKSPACE = "workspace"
DEFAULT_BASELINE = "main"
# Images shown per revision: (column title, path in the project). A revision must have the
# grids; the optional images get a column when at least one revision has them.
GRIDS = (
    ("single embedding", "reports/grid_single.png"),
    ("multiple embeddings", "reports/grid_multi.png"),
)
OPTIONAL_IMAGES = (("adherence", "reports/plots/adherence.png"),)
PARAMS = "params.yaml"
METRICS_DIR = "reports/metrics"
MISSING = "—"
EXP_REFS = "refs/exps/"
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_OUR_IMAGE_DIR = re.compile(r"^\d+-")


class CompareError(DeprojectorError):
    """A revision that cannot be compared, or a failed git."""


class MissingRevisionError(CompareError):
    """A revision that does not exist or has no rendered reports."""


@dataclass(frozen=True)
class Revision:
    name: str  # as the user wrote it
    commit: str | None  # None: the workspace
    dvc_rev: str  # what git/dvc are given: the name, or origin/NAME
    subject: str = ""  # the commit's first line

    @property
    def title(self) -> str:
        if self.commit is None:
            return f"**{WORKSPACE}** (files on disk)"
        via = f" via `{self.dvc_rev}`" if self.dvc_rev != self.name else ""
        sha = "" if self.commit.startswith(self.name) else f" `{self.commit[:7]}`"
        subject = self.subject if len(self.subject) <= 72 else self.subject[:71] + "…"
        subject = subject.replace("|", "\\|")
        return f"**{self.name}**{via}{sha} {subject}".rstrip()


def _run(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(list(args), cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError as err:
        raise CompareError(f"`{args[0]}` is not installed: {err}") from err


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """stdout of a git command, None when it fails."""
    done = _run(["git", *args], cwd)
    return done.stdout.decode().strip() if done.returncode == 0 else None


def experiment_commit(name: str, root: Path) -> str | None:
    """The commit of the `dvc exp` experiment NAME (refs/exps/ab/cdef…/NAME), if one exists."""
    listing = _git(["for-each-ref", "--format=%(objectname) %(refname)", EXP_REFS], root) or ""
    found = []
    for line in listing.splitlines():
        sha, ref = line.split(" ", 1)
        parts = ref.split("/")  # refs exps ab cdef... name; skips refs/exps/exec/..., stash
        if len(parts) == 5 and len(parts[2]) == 2 and parts[4] == name:
            found.append((ref, sha))
    if len(found) > 1:
        refs = ", ".join(ref for ref, _ in sorted(found))
        raise CompareError(f"experiment name {name!r} is ambiguous ({refs}): give its commit")
    return found[0][1] if found else None


def _commit(rev: str, root: Path) -> str | None:
    return _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root)


def resolve(name: str, root: Path) -> Revision:
    """NAME as a revision: `workspace`, a git revision, a dvc experiment or origin/NAME."""
    if name == WORKSPACE:
        return Revision(name, None, WORKSPACE)
    if _git(["rev-parse", "--is-inside-work-tree"], root) != "true":
        raise CompareError(
            f"{root.resolve()} is not inside a git repository: compare reads committed results"
        )
    dvc_rev, commit = name, None
    if name and not name.startswith("-"):
        commit = _commit(name, root) or experiment_commit(name, root)
        if commit is None and (commit := _commit(f"origin/{name}", root)):
            dvc_rev = f"origin/{name}"
    if commit is None:
        raise MissingRevisionError(
            f"unknown revision {name!r}: not a git revision, a `dvc exp` "
            "experiment (see `dvc exp list --all-commits`) or a branch of origin"
        )
    subject = _git(["log", "-1", "--format=%s", commit], root) or ""
    return Revision(name, commit, dvc_rev, subject)


def read_file(rev: Revision, path: str, root: Path) -> bytes | None:
    """The bytes of PATH (relative to the project folder) at REV; None if it has none."""
    if rev.commit is None:
        file = root / path
        return file.read_bytes() if file.is_file() else None
    done = _run(["git", "cat-file", "blob", f"{rev.commit}:./{path}"], root)
    return done.stdout if done.returncode == 0 else None


def list_files(rev: Revision, folder: str, root: Path) -> list[str]:
    """The paths (relative to the project folder) of the files directly in FOLDER at REV."""
    if rev.commit is None:
        where = root / folder
        return (
            sorted(f"{folder}/{p.name}" for p in where.iterdir() if p.is_file())
            if where.is_dir()
            else []
        )
    listing = _git(["ls-tree", "--name-only", f"{rev.commit}:./{folder}"], root) or ""
    return [f"{folder}/{name}" for name in listing.splitlines()]


def read_params(rev: Revision, root: Path) -> dict[str, Any]:
    """params.yaml at REV, parsed; {} where it has none."""
    data = read_file(rev, PARAMS, root)
    return (yaml.safe_load(data) or {}) if data else {}


def flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    """PARAMS as {dotted.key: value as JSON text}, as `dvc params diff` names them."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            out[prefix] = json.dumps(value)

    walk("", params)
    return out


def revision_headline(rev: Revision, root: Path, runs: Sequence[str] = ()) -> Headline:
    """The headline of REV's evaluate records (reports/metrics/*.json), in the order the
    evaluate stage writes it (the baselines, then `runs`: params' `models:`); {} without
    records."""
    order = [NULL_BASELINE, RETRIEVAL, *runs]
    paths = [p for p in list_files(rev, METRICS_DIR, root) if p.endswith(".json")]
    records = {}
    for path in sorted(
        paths, key=lambda p: (order.index(Path(p).stem) if Path(p).stem in order else len(order), p)
    ):
        data = read_file(rev, path, root)
        if data is not None:
            records[Path(path).stem] = json.loads(data)
    return headline(records)


def _number(value: float | int | None, first: float | int | None) -> str:
    """A table cell: the value (4 decimals) and, after the first column, its change."""
    if value is None:
        return MISSING
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    if first is None or value == first:
        return text
    return f"{text} ({value - first:+.4f})"


def params_table(revisions: Sequence[Revision], params: Sequence[Mapping[str, Any]]) -> list[str]:
    """The params.yaml keys whose values differ between the revisions (PARAMS: each one's
    params.yaml), a column each."""
    values = [flat_params(p) for p in params]
    keys = sorted({key for v in values for key in v})
    differ = [key for key in keys if len({v.get(key, MISSING) for v in values}) > 1]
    if not differ:
        return [f"No param differs ({len(keys)} in `{PARAMS}`)."]
    lines = [
        f"{len(differ)} of {len(keys)} params differ (`{PARAMS}`):",
        "",
        "| param | " + " | ".join(f"`{rev.name}`" for rev in revisions) + " |",
        "| --- |" + " --- |" * len(revisions),
    ]
    for key in differ:
        cells = [v.get(key, MISSING).replace("|", "\\|") for v in values]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return lines


def metrics_table(revisions: Sequence[Revision], heads: Sequence[Headline]) -> list[str]:
    """Every headline number of the revisions (HEADS: each one's): a line per (row, key), a
    column per revision; the later columns add their difference to the first."""
    keys: dict[tuple[str, str], None] = {}
    for head in heads:
        keys.update(dict.fromkeys((row, key) for row, numbers in head.items() for key in numbers))
    if not keys:
        return [f"No revision has evaluate records (`{METRICS_DIR}/`)."]
    changed = sum(len({head.get(row, {}).get(key) for head in heads}) > 1 for row, key in keys)
    lines = [
        f"The headline (`reports/headline.json`, read from each revision's `{METRICS_DIR}/`); "
        f"{changed} of {len(keys)} numbers differ between the revisions:",
        "",
        "| row | metric | " + " | ".join(f"`{rev.name}`" for rev in revisions) + " |",
        "| --- | --- |" + " --- |" * len(revisions),
    ]
    for row, key in keys:
        first = heads[0].get(row, {}).get(key)
        cells = [
            _number(head.get(row, {}).get(key), first if i else None)
            for i, head in enumerate(heads)
        ]
        lines.append(f"| {row} | {key} | " + " | ".join(cells) + " |")
    return lines


def _slug(index: int, name: str) -> str:
    return f"{index}-{_SLUG_UNSAFE.sub('-', name).strip('-') or 'rev'}"


def _clear_images(image_dir: Path) -> None:
    """Remove the per-revision folders a previous report left (only those: N-name)."""
    if image_dir.is_dir():
        for folder in image_dir.iterdir():
            if folder.is_dir() and _OUR_IMAGE_DIR.match(folder.name):
                shutil.rmtree(folder)


def default_revisions(names: Sequence[str]) -> list[str]:
    """No name: main against the workspace; one name: it against the workspace."""
    names = list(names)
    if not names:
        return [DEFAULT_BASELINE, WORKSPACE]
    return names if len(names) > 1 else [*names, WORKSPACE]


def write_comparison(
    names: Sequence[str], out: Path = Path("reports/compare.md"), root: Path = Path(".")
) -> Path:
    """Write OUT (markdown) and its images into OUT's folder / OUT's stem; return OUT.

    One table of grids (a row per revision), one of the params that differ, one of the
    headline metrics (a column per revision; later ones with their difference to the first).
    """
    revisions = [resolve(name, root) for name in default_revisions(names)]
    images: dict[str, list[bytes | None]] = {}
    for rev in revisions:
        for title, path in GRIDS:
            data = read_file(rev, path, root)
            if data is None:
                where = (
                    "the workspace"
                    if rev.commit is None
                    else f"revision {rev.name!r} ({rev.commit[:7]})"
                )
                raise MissingRevisionError(
                    f"{where} has no {path}: no reports were rendered there "
                    "(run `dvc repro`, and commit reports/)"
                )
            images.setdefault(title, []).append(data)
    for title, path in OPTIONAL_IMAGES:
        found = [read_file(rev, path, root) for rev in revisions]
        if any(data is not None for data in found):
            images[title] = found

    out = root / out
    image_dir = out.parent / out.stem
    _clear_images(image_dir)
    paths = {title: path for title, path in (*GRIDS, *OPTIONAL_IMAGES)}
    rows = []
    for index, rev in enumerate(revisions, 1):
        folder = image_dir / _slug(index, rev.name)
        cells = []
        for title, per_rev in images.items():
            data = per_rev[index - 1]
            if data is None:
                cells.append("—")
                continue
            file = folder / Path(paths[title]).name
            write_bytes(file, data)
            link = file.relative_to(out.parent).as_posix()
            cells.append(f"![{rev.name}: {title}]({link})")
        rows.append(f"| {rev.title} | " + " | ".join(cells) + " |")

    params = [read_params(rev, root) for rev in revisions]
    heads = [
        revision_headline(rev, root, list(p.get("models") or {}))
        for rev, p in zip(revisions, params, strict=True)
    ]
    names_line = " → ".join(f"`{rev.name}`" for rev in revisions)
    lines = [
        f"# Comparison: {names_line}",
        "",
        "Results as committed (`deprojector compare` retrains nothing). Grids: rows "
        "`reference` (plain CLIP states), then each deprojector; columns the prompts "
        "(`render.world_prompts_*` or `render.article_prompts_*`).",
        "",
        "| revision | " + " | ".join(images) + " |",
        "| --- | " + " | ".join("---" for _ in images) + " |",
        *rows,
        "",
        "## Params",
        "",
        *params_table(revisions, params),
        "",
        "## Metrics",
        "",
        *metrics_table(revisions, heads),
    ]
    write_text(out, "\n".join(lines) + "\n")
    return out
