"""`deprojector compare`: grids, params and metrics of several revisions in one markdown report.

Reads committed results only (it never runs a stage): the grids of each revision come from
git (`reports/*.png` are committed, `cache: false`), the params and metrics tables from
`dvc params diff --md` and `dvc metrics diff --md`. A revision is a git revision (branch, tag,
commit, `HEAD~1`), the name of a `dvc exp run` experiment (a git ref
`refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`), a branch that exists only as `origin/NAME`
(a CI checkout has no local `main`), or `workspace` (the files on disk). The report and its
images are CI artefacts, not stage outputs, and are git-ignored.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.atomic import write_bytes, write_text
from pipeline.core.errors import DeprojectorError

WORKSPACE = "workspace"
DEFAULT_BASELINE = "main"
# Images shown per revision: (column title, path in the project). A revision must have the
# grids; the optional images get a column when at least one revision has them.
GRIDS = (
    ("single embedding", "reports/grid_single.png"),
    ("multiple embeddings", "reports/grid_multi.png"),
)
OPTIONAL_IMAGES = (("adherence", "reports/plots/adherence.png"),)
EXP_REFS = "refs/exps/"
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_OUR_IMAGE_DIR = re.compile(r"^\d+-")


class CompareError(DeprojectorError):
    """A revision that cannot be compared, or a failed tool (git, dvc)."""


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
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        return subprocess.run(list(args), cwd=cwd, capture_output=True, env=env, check=False)
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


def dvc_diff_md(what: str, a: Revision, b: Revision, root: Path) -> str:
    """`dvc {params,metrics} diff --md A B`: the changed entries as a markdown table."""
    done = _run([sys.executable, "-m", "dvc", what, "diff", "--md", a.dvc_rev, b.dvc_rev], root)
    if done.returncode != 0:
        lines = (done.stderr.decode() or done.stdout.decode()).strip().splitlines()
        command = shlex.join(["dvc", what, "diff", a.dvc_rev, b.dvc_rev])
        raise CompareError(
            f"`{command}` failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
        )
    table = done.stdout.decode().strip()
    # dvc prints nothing, or a header without rows, when nothing differs
    return table if len(table.splitlines()) > 2 else f"No {what[:-1]} differs."


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

    Every revision after the first is compared with the first (params and metrics).
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

    base = revisions[0]
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
    ]
    for rev in revisions[1:]:
        pair = f"`{base.name}` → `{rev.name}`"
        lines += [
            "",
            f"## Params: {pair}",
            "",
            dvc_diff_md("params", base, rev, root),
            "",
            f"## Metrics: {pair}",
            "",
            dvc_diff_md("metrics", base, rev, root),
        ]
    write_text(out, "\n".join(lines) + "\n")
    return out
