"""`deprojector compare` on a throwaway git + DVC repository: commits whose params, evaluate
records and grids differ, and a `dvc exp`-style experiment ref. No pipeline runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.reporting.compare import CompareError, resolve, write_comparison

DVC_YAML = {
    "stages": {
        "render": {
            "cmd": "echo rendered elsewhere",
            "params": ["train"],
            "metrics": [{"reports/headline.json": {"cache": False}}],
            "outs": [
                {"reports/metrics": {"cache": False}},
                {"reports/grid_single.png": {"cache": False}},
                {"reports/grid_multi.png": {"cache": False}},
            ],
        }
    },
    "plots": ["reports/grid_single.png", "reports/grid_multi.png"],
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def write_revision(repo: Path, epochs: int, cosine: float, grey: int) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": epochs}}))
    reports = repo / "reports"
    (reports / "metrics").mkdir(parents=True, exist_ok=True)
    record = {"autoregressive": {"cosine_masked": cosine, "cosine_masked_ci95": [0.5, 0.7]}}
    (reports / "metrics" / "vt.json").write_text(json.dumps(record))
    for i, name in enumerate(("grid_single.png", "grid_multi.png")):
        Image.new("L", (8, 6), grey + i).save(reports / name)


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("project")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "ci@example.com")
    git(repo, "config", "user.name", "CI")
    Repo.init(str(repo)).close()
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    commit(repo, "no reports yet")
    write_revision(repo, epochs=2, cosine=0.52, grey=10)
    commit(repo, "two epochs")
    git(repo, "tag", "v1")
    # an experiment: a commit reachable only from a dvc-style ref refs/exps/ab/cdef.../NAME
    baseline = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "exp-tmp")
    write_revision(repo, epochs=5, cosine=0.61, grey=200)
    exp = commit(repo, "exp: five epochs")
    git(repo, "checkout", "-q", "main")
    git(repo, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/five-epochs", exp)
    git(repo, "branch", "-q", "-D", "exp-tmp")
    write_revision(repo, epochs=3, cosine=0.55, grey=90)
    commit(repo, "three epochs | more")
    return repo


def image_links(report: Path) -> list[Path]:
    return [
        report.parent / link for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report.read_text())
    ]


def test_report_shows_both_revisions_grids_and_the_changed_param_and_metric(repo: Path) -> None:
    report = write_comparison(["v1", "main"], Path("reports/compare.md"), root=repo)
    text = report.read_text()
    v1, main = git(repo, "rev-parse", "v1")[:7], git(repo, "rev-parse", "main")[:7]
    assert f"**v1** `{v1}` two epochs" in text
    assert f"**main** `{main}` three epochs \\| more" in text  # a | in a subject is escaped

    links = image_links(report)
    assert [p.relative_to(repo).as_posix() for p in links] == [
        "reports/compare/1-v1/grid_single.png",
        "reports/compare/1-v1/grid_multi.png",
        "reports/compare/2-main/grid_single.png",
        "reports/compare/2-main/grid_multi.png",
    ]
    for path in links:  # each link is the committed image of its revision
        rev = "v1" if "/1-v1/" in path.as_posix() else "main"
        committed = subprocess.run(
            ["git", "show", f"{rev}:reports/{path.name}"], cwd=repo, check=True, capture_output=True
        ).stdout
        assert path.read_bytes() == committed
    assert Image.open(links[0]).getpixel((0, 0)) == 10
    assert Image.open(links[2]).getpixel((0, 0)) == 90

    params = text.split("## Params")[1].split("## Metrics")[0]
    assert "| `train.epochs` | 2 | 3 |" in params
    metrics = text.split("## Metrics")[1]
    assert "| vt | ar_cosine_masked | 0.5200 | 0.5500 (+0.0300) |" in metrics
    assert "| vt | ar_cosine_masked_low | 0.5000 | 0.5000 |" in metrics


def test_several_revisions_share_one_params_and_one_metrics_table(repo: Path) -> None:
    """Three revisions: one column each (not each compared with the first in its own
    section), later ones with their difference to the first; equal params left out."""
    report = write_comparison(["v1", "five-epochs", "main"], Path("reports/c3.md"), root=repo)
    text = report.read_text()
    assert text.count("## Params") == 1 and text.count("## Metrics") == 1
    assert "| param | `v1` | `five-epochs` | `main` |" in text
    assert "| `train.epochs` | 2 | 5 | 3 |" in text
    assert "1 of 1 params differ" in text
    assert "| vt | ar_cosine_masked | 0.5200 | 0.6100 (+0.0900) | 0.5500 (+0.0300) |" in text
    assert "1 of 3 numbers differ" in text
    assert len(text.splitlines()) < 30


def test_the_report_is_deterministic_and_drops_stale_images(repo: Path) -> None:
    out = repo / "reports" / "compare.md"
    write_comparison(["v1", "five-epochs", "main"], Path("reports/compare.md"), root=repo)
    stale = repo / "reports" / "compare" / "2-five-epochs" / "grid_single.png"
    assert stale.exists()
    first = out.read_bytes(), {p: p.read_bytes() for p in image_links(out)}
    write_comparison(["v1", "main"], Path("reports/compare.md"), root=repo)
    second = out.read_bytes(), {p: p.read_bytes() for p in image_links(out)}
    write_comparison(["v1", "main"], Path("reports/compare.md"), root=repo)
    assert (out.read_bytes(), {p: p.read_bytes() for p in image_links(out)}) == second
    assert first != second and not stale.parent.exists()


def test_a_dvc_experiment_is_compared_by_name(repo: Path) -> None:
    assert resolve("five-epochs", repo).commit == git(
        repo, "for-each-ref", "--format=%(objectname)", "refs/exps/"
    )
    report = write_comparison(["v1", "five-epochs"], Path("reports/compare.md"), root=repo)
    text = report.read_text()
    assert "**five-epochs**" in text and "exp: five epochs" in text
    assert "| 2 | 5 |" in text.split("## Params")[1]
    assert "0.6100 (+0.0900)" in text.split("## Metrics")[1]
    exp_grid = repo / "reports" / "compare" / "2-five-epochs" / "grid_single.png"
    assert Image.open(exp_grid).getpixel((0, 0)) == 200


def test_cli_defaults_to_main_against_the_workspace(repo: Path, monkeypatch) -> None:
    monkeypatch.chdir(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 7}}))
    try:
        result = CliRunner().invoke(app, ["compare"])
        assert result.exit_code == 0, result.output
        text = (repo / "reports" / "compare.md").read_text()
        assert "# Comparison: `main` → `workspace`" in text
        assert "**workspace** (files on disk)" in text
        assert "| `train.epochs` | 3 | 7 |" in text
        assert "0 of 3 numbers differ" in text and "(+" not in text
    finally:
        git(repo, "checkout", "-q", "--", "params.yaml")


def test_a_revision_without_reports_is_a_clear_error(repo: Path, monkeypatch) -> None:
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(app, ["compare", "main~2", "main"])
    assert result.exit_code == 2
    short = git(repo, "rev-parse", "main~2")[:7]
    assert f"error: revision 'main~2' ({short}) has no reports/grid_single.png" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["compare", "no-such-branch"])
    assert result.exit_code == 2
    assert "unknown revision 'no-such-branch'" in result.output


def test_skip_missing_exits_0_without_a_report_for_ci(repo: Path, monkeypatch) -> None:
    monkeypatch.chdir(repo)
    (repo / "reports" / "compare.md").unlink(missing_ok=True)
    for revision in ("main~2", "main~9"):  # no reports there / no such commit
        result = CliRunner().invoke(app, ["compare", revision, "--skip-missing"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("compare skipped: ") and revision in result.output
    assert not (repo / "reports" / "compare.md").exists()


def test_a_branch_known_only_on_origin_resolves_there(repo: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "checkout", "-q", "--detach", "v1")
    git(clone, "branch", "-q", "-D", "main")  # as in a CI checkout of a pull request
    rev = resolve("main", clone)
    assert rev.dvc_rev == "origin/main" and rev.commit == git(repo, "rev-parse", "main")
    with pytest.raises(CompareError, match="not inside a git repository"):
        resolve("main", tmp_path)
