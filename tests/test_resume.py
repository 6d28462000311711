"""Stages killed with SIGKILL resume to exactly the result of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMALL, project_dir, run_small_pipeline, small_params
from tests.test_extract import digest

ROOT = Path(__file__).resolve().parents[1]


def write_params(work: Path, **sections) -> None:
    raw = {name: dict(values) for name, values in SMALL.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))


def start(work: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the stage never reached the kill point"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def run(work: Path, *args: str) -> None:
    process = start(work, *args)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
def test_extraction_killed_midway_resumes_to_identical_shards(tmp_path, base_dir):
    settings = {"extract": {"rows_per_shard": 4, "batch_size": 4}}
    reference = run_small_pipeline(tmp_path / "reference", base_dir, small_params(**settings))
    work = tmp_path / "killed"
    run_small_pipeline(work, base_dir, small_params(**settings))  # captions (and shards to remove)
    shutil.rmtree(work / "data" / "shards")
    write_params(work, **settings)
    process = start(work, "extract")
    train = work / "data" / "shards" / "train"
    kill_when(process, lambda: len(list(train.glob("shard-*.arrow"))) >= 3)
    done_before = len(list(train.glob("shard-*.arrow")))
    assert done_before < 12  # killed midway: 48 rows = 12 shards
    run(work, "extract")
    assert digest(work / "data" / "shards") == digest(reference)


@pytest.mark.slow
def test_training_killed_midway_resumes_to_identical_weights(tmp_path, base_dir, small_shards):
    settings = {
        "train": {"epochs": 12, "batch_size": 16, "patience": 0},
        "models": {"vicinity-batch": {"type": "vicinity-batch", "norm": "layer"}},
    }
    results = {}
    for name in ("reference", "killed"):
        work = project_dir(tmp_path / name, base_dir)
        shutil.copytree(small_shards.parent, work / "data")
        write_params(work, **settings)
        if name == "killed":
            process = start(work, "train", "vicinity-batch")
            checkpoint = work / "data" / "checkpoints" / "vicinity-batch.pt"
            kill_when(process, checkpoint.exists)
            assert not (work / "models" / "vicinity-batch").exists()
        run(work, "train", "vicinity-batch")
        results[name] = (work / "models" / "vicinity-batch" / "model.safetensors").read_bytes()
    assert results["killed"] == results["reference"]
