"""The study (study/): the main pipeline at the article's scale, kept in step with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
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


# The study's rerun on world v2 with every run of issue 30 (study/params.yaml) is under way:
# its finished stages are committed one by one (study/dvc.lock, study/models/NAME,
# study/reports/train/NAME.json); evaluate and render have not run, so study/reports holds no
# metrics yet. The study before it (world v1, without the one-pass runs) is at commit e281a03.
# False once `dvc repro study/dvc.yaml` has finished and its results are committed.
RERUN_IN_PROGRESS = True


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
    if RERUN_IN_PROGRESS:
        pytest.skip("the study's rerun is in progress: test_the_rerun_in_progress_is_consistent")
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


def test_the_rerun_in_progress_is_consistent() -> None:
    """While the rerun is under way, what is committed of it is complete and current: every
    stage in study/dvc.lock ran on today's study params and left its outputs, and nothing of
    evaluate's or render's (nor of the previous study) looks like a result."""
    if not RERUN_IN_PROGRESS:
        pytest.skip("the study is finished: test_committed_study_results_cover_every_run")
    params = yaml.safe_load((STUDY / "params.yaml").read_text())
    lock = yaml.safe_load((STUDY / "dvc.lock").read_text())["stages"]
    assert {"captions", "gap", "extract"} <= set(lock)
    assert not {"evaluate", "render"} & set(lock)
    trained = {name.removeprefix("train@") for name in lock if name.startswith("train@")}
    assert trained <= set(params["models"]), trained - set(params["models"])
    for name in trained:
        recorded = lock[f"train@{name}"]["params"]["params.yaml"]
        assert recorded[f"models.{name}"] == params["models"][name], name
        assert recorded["train"] == params["train"], name
        assert (STUDY / "models" / name / "config.json").is_file(), name
        assert (STUDY / "reports" / "train" / f"{name}.json").is_file(), name
    assert sorted(p.stem for p in (STUDY / "reports" / "train").glob("*.json")) == sorted(trained)
    assert not (STUDY / "reports" / "metrics").exists()
    assert not (STUDY / "reports" / "headline.json").exists()
    readme = (ROOT / "README.md").read_text()
    assert "study's rerun is in progress" in " ".join(readme.split())
