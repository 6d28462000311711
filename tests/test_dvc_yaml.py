"""dvc.yaml takes its runs from params.yaml: a run added there is a train stage, a dependency
of evaluate and render, and a plot, with no name written in dvc.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.models import ARCHITECTURES, COMPOSITES

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def test_dvc_yaml_names_no_run_and_every_architecture_is_registered() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    runs = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    for name in runs:
        assert f"models/{name}" not in text and f"{name}.json" not in text, name
    for name, entry in runs.items():
        assert entry["type"] in ARCHITECTURES or entry["type"] in COMPOSITES, name


def test_a_run_added_in_params_gets_its_train_stage(tmp_path) -> None:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["models"]["vicinity-batch-v2"] = {"type": "vicinity-batch", "vicinity": 2}
    del raw["models"]["vicinity-individual"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=tmp_path, check=True)
    stages = subprocess.run(
        [*DVC, "stage", "list", "--name-only"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    trains = [s for s in stages if s.startswith("train@")]
    assert trains == [f"train@{name}" for name in raw["models"]]
    assert "evaluate" in stages and "render" in stages
