"""The study (study/): the main pipeline at the article's scale, kept in step with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pipeline.config.params import load_params, parse_models
from pipeline.metrics.significance import seed_replicates

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "study"
# Paths of the main project that the study's stages read from the repository, not from study/.
SHARED = re.compile(r"^(pipeline/.*|models/world|data/gap-pairs)$")


def rerooted(value):
    """The main dvc.yaml's entry as study/dvc.yaml must have it: shared paths under ../."""
    if isinstance(value, str):
        return f"../{value}" if SHARED.match(value) else value
    if isinstance(value, list):
        return [rerooted(v) for v in value]
    if isinstance(value, dict):
        return {rerooted(k): rerooted(v) for k, v in value.items()}
    return value


def test_the_study_pipeline_is_the_main_one_rerooted() -> None:
    main = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    study = yaml.safe_load((STUDY / "dvc.yaml").read_text())
    del main["stages"]["world"]  # the study uses the repository's world
    # The one difference in kind: the study declares no DVC metrics, its headline is a plain
    # output, so `dvc exp show` and `dvc metrics show` list the main project's alone.
    evaluate = main["stages"]["evaluate"]
    evaluate["outs"] = evaluate.pop("metrics") + evaluate["outs"]
    assert not any("metrics" in stage for stage in main["stages"].values())
    assert study == {"stages": rerooted(main["stages"]), "plots": main["plots"]}


def test_dvc_lists_the_main_projects_headline_alone() -> None:
    """`dvc metrics show` (and `dvc exp show`) read reports/headline.json only; the study's is
    a target away."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:  # {revision ("": the workspace): {"data": {file: ...}}}
        (shown,) = repo.metrics.show().values()
        (study,) = repo.metrics.show(targets=["study/reports/headline.json"]).values()
    assert list(shown["data"]) == ["reports/headline.json"]
    assert list(study["data"]) == ["study/reports/headline.json"]


def test_the_study_params_differ_only_in_scale_and_added_runs() -> None:
    main = yaml.safe_load((ROOT / "params.yaml").read_text())
    study = yaml.safe_load((STUDY / "params.yaml").read_text())
    assert study["captions"].pop("train_size") == 50000  # the article's
    assert 200 <= study["captions"].pop("test_size") <= 1000  # "a few hundred"
    for key in ("train_size", "test_size"):
        main["captions"].pop(key)
    assert study["gap"].pop("source") == "../" + main["gap"].pop("source")
    # Every run of the main project, unchanged; the study adds seed replicates.
    for name, entry in main.pop("models").items():
        assert study["models"][name] == entry, name
    study.pop("models")
    assert study == main


def test_the_study_has_three_seeds_of_its_headline_runs() -> None:
    params = load_params(STUDY / "params.yaml")
    groups = seed_replicates(params.models, params.train.seed)
    for run in ("queries", "vt-rollout", "transformer"):
        seeds = {params.models[n].train.get("seed", params.train.seed) for n in groups[run]}
        assert len(seeds) >= 3, run


def test_committed_study_results_cover_every_run() -> None:
    """What study/reports holds is a finished study: every run's curve and metrics."""
    metrics = STUDY / "reports" / "metrics"
    params = load_params(STUDY / "params.yaml")
    for name in params.models:
        assert (metrics / f"{name}.json").is_file(), name
        assert (STUDY / "reports" / "train" / f"{name}.json").is_file(), name
    lock = yaml.safe_load((STUDY / "dvc.lock").read_text())["stages"]
    assert {f"train@{name}" for name in params.models} | {"evaluate", "render"} <= set(lock)
    comparison = json.loads((metrics / "comparison.json").read_text())
    assert set(comparison["seed_spread"]) == set(seed_replicates(params.models, params.train.seed))


def test_seed_replicates_need_distinct_effective_seeds() -> None:
    """A run without its own seed trains with `train.seed`: two such copies are the same run,
    not replicates, and neither is a copy whose own seed equals `train.seed`."""
    spec = {"type": "lstm", "num_layers": 2}
    models = parse_models(
        {
            "a": spec,
            "b": spec,
            "c": {**spec, "train": {"seed": 0}},
            "d": {**spec, "train": {"seed": 1}},
        }
    )
    assert seed_replicates(models, train_seed=0) == {"a": ["a", "d"]}
    assert seed_replicates(models, train_seed=1) == {"a": ["a", "c"]}
    assert seed_replicates({k: models[k] for k in "ab"}, train_seed=0) == {}


def table_rows(markdown: str, header: str) -> dict[str, list[str]]:
    """{row name: its numbers as written} of the markdown table whose first line starts with
    `header`; a name is its first word, backticks dropped ("`queries` (one pass)" → queries)."""
    lines = markdown[markdown.index(header) :].splitlines()
    rows: dict[str, list[str]] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        name = name.split()[0].strip("`")
        rows[name] = re.findall(r"[-+]?\d+\.\d+", " ".join(cells).replace("−", "-"))
    return rows


def test_the_readmes_results_table_is_the_studys_own() -> None:
    """Every figure of the README's results table is, to the digits shown, one of the same
    row's figures in the study's generated report ("In one table")."""
    readme = table_rows((ROOT / "README.md").read_text(), "| row | states |")
    report = table_rows((STUDY / "reports" / "report.md").read_text(), "| row | AR cosine")
    assert {"queries", "transformer", "retrieval", "blend"} <= set(readme)
    for name, numbers in readme.items():
        assert numbers, name
        for shown in numbers:
            half_unit = 0.5 * 10 ** -len(shown.split(".")[1]) + 1e-9  # 0.205 shows as 0.21
            assert any(abs(float(shown) - float(n)) <= half_unit for n in report[name]), (
                name,
                shown,
            )
