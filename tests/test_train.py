"""Training and evaluation stages on a small extracted dataset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.config.params import ParamsError
from pipeline.core.jsonio import round_floats
from pipeline.metrics.retrieval import K_CANDIDATES
from pipeline.models import ARCHITECTURES, load_deprojector
from pipeline.stages import evaluate as evaluate_module
from pipeline.stages.evaluate import run_evaluate_stage
from pipeline.stages.gap import run_gap_stage
from pipeline.training import loop as train_module
from pipeline.training.loop import train_model
from tests.conftest import SMALL, project_dir, small_params

TRAIN = {"epochs": 2, "batch_size": 16, "patience": 0, "seed": 0}
# params.yaml's `models:` (run name -> type and hyperparameters), as a user writes it.
TINY_MODELS = {
    "transformer": {"type": "transformer"},
    "vicinity-batch": {"type": "vicinity-batch", "norm": "layer"},
    "vicinity-individual": {"type": "vicinity-individual", "norm": "layer"},
}


@pytest.fixture
def project(tmp_path, base_dir, small_shards, monkeypatch):
    """A project folder holding the small shards, as cwd."""
    work = project_dir(tmp_path, base_dir)
    shutil.copytree(small_shards.parent, work / "data")
    monkeypatch.chdir(work)
    return work


def params(models: dict | None = None, **train):
    return small_params(
        train={**TRAIN, **train},
        evaluate={
            "combination_pairs": 8,
            "adherence_prompts": 16,
            "image_prompts": 6,
            "bridges": "all",
        },
        models=models or TINY_MODELS,
    )


def test_training_saves_a_loadable_model_and_a_loss_curve(project):
    history = train_model("vicinity-batch", params())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    model = load_deprojector(project / "models" / "vicinity-batch")
    assert model.config.norm == "layer"
    curve = json.loads((project / "reports" / "train" / "vicinity-batch.json").read_text())
    assert curve == round_floats(history)  # stored to 6 significant digits (jsonio)
    assert not (project / "data" / "checkpoints" / "vicinity-batch.pt").exists()


def interrupt_in_epoch_2(monkeypatch, after_epoch_1=lambda: None) -> None:
    """Train `transformer` and interrupt it after epoch 1's checkpoint (the test-loss pass of
    epoch 2 raises), calling after_epoch_1 at epoch 1's test-loss pass; then restore the pass."""
    real = train_module.evaluate_loss
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        after_epoch_1()
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_loss", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_model("transformer", params())
    monkeypatch.setattr(train_module, "evaluate_loss", real)


def test_same_seed_same_weights_and_interrupted_run_resumes_to_the_same_result(
    project, monkeypatch
):
    train_model("transformer", params())
    reference = load_deprojector(project / "models" / "transformer").state_dict()

    shutil.rmtree(project / "models" / "transformer")
    interrupt_in_epoch_2(monkeypatch)
    assert (project / "data" / "checkpoints" / "transformer.pt").exists()
    history = train_model("transformer", params())
    assert len(history) == 2
    resumed = load_deprojector(project / "models" / "transformer").state_dict()
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key


def test_a_resumed_runs_card_counts_the_training_time_of_every_process(project, monkeypatch):
    """The card's training seconds add the interrupted process's epochs to the resumed one's
    (the checkpoint carries them), on a clock that only the first process's epoch advances."""
    clock = {"now": 0.0}
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))

    def first_epoch_takes_1000_s() -> None:  # nothing else moves the clock
        clock["now"] += 1000.0

    interrupt_in_epoch_2(monkeypatch, first_epoch_takes_1000_s)
    train_model("transformer", params())
    card = yaml.safe_load(
        (project / "models" / "transformer" / "README.md").read_text().split("---")[1]
    )
    assert card["training"]["seconds"] == 1000.0
    assert card["training"]["epochs"] == 2


def test_unknown_model_setting_is_rejected_naming_the_key(project):
    from pipeline.stages.train import run_train_stage

    with pytest.raises(ParamsError, match=r"`models\.vicinity-batch\.vicinityy`"):
        run_train_stage(
            "vicinity-batch", params({"vicinity-batch": {"type": "vicinity-batch", "vicinityy": 2}})
        )
    with pytest.raises(ParamsError, match=r"no `models\.vicinity-batch-v3` \(defined: transformer"):
        train_model("vicinity-batch-v3", params())


def assert_within(scores: dict, key: str) -> None:
    """`key` has a 95 % interval (KEY_ci95) around its value; a ratio's is None where its
    denominator sums to 0 in some resamples (few pictures judged right)."""
    bounds = scores[f"{key}_ci95"]
    if bounds is None:
        assert key in ("adherence_ratio", "image_to_text"), (key, scores)
    else:
        assert bounds[0] <= scores[key] <= bounds[1], (key, scores)


@pytest.mark.slow
def test_evaluate_writes_every_metric_and_is_deterministic(project, monkeypatch):
    # A run added in params only (another vicinity-batch) is trained and scored like the rest;
    # so are a seed replicate and an ensemble (which trains nothing).
    runs = {
        **TINY_MODELS,
        "vicinity-batch-v2": {"type": "vicinity-batch", "vicinity": 2},
        "vicinity-batch-seed1": {**TINY_MODELS["vicinity-batch"], "train": {"seed": 1}},
        "ensemble": {"type": "ensemble", "members": ["transformer", "vicinity-batch"]},
    }
    names = tuple(runs)
    for name in names:
        train_model(name, params(runs, epochs=1))
    assert load_deprojector(project / "models" / "vicinity-batch-v2").config.vicinity == 2
    run_gap_stage(small_params(gap={"pairs": 32, "seed": 7}), Path("data/gap"))  # images
    chosen = []  # the retrieval's k is chosen on the training split only
    real_choose_k = evaluate_module.choose_k
    monkeypatch.setattr(
        evaluate_module,
        "choose_k",
        lambda reader, *args: (
            chosen.append((reader.split_dir.name, real_choose_k(reader, *args))) or chosen[-1][1]
        ),
    )
    first = run_evaluate_stage(params(runs))
    metrics = project / "reports" / "metrics"
    written = {p.name: p.read_bytes() for p in metrics.iterdir()}
    # The second run goes through the CLI (its summary lines read every result) and must
    # write the same bytes.
    (project / "params.yaml").write_text(
        yaml.safe_dump(
            {
                **SMALL,
                "train": {**TRAIN, "epochs": 1},
                "evaluate": {
                    "combination_pairs": 8,
                    "adherence_prompts": 16,
                    "image_prompts": 6,
                    "bridges": "all",
                },
                "models": runs,
            },
            sort_keys=False,
        )
    )  # the runs in the same order
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    assert "best autoregressive cosine_masked:" in result.output
    assert {p.name: p.read_bytes() for p in metrics.iterdir()} == written
    for name in ("null-baseline", "retrieval", *names):
        saved = json.loads((metrics / f"{name}.json").read_text())
        for mode in ("teacher_forced", "autoregressive"):
            keys = ("mse", "weighted_mse", "cosine", "cosine_masked")
            assert set(saved[mode]) == {*keys, *(f"{key}_ci95" for key in keys)}
            for key in keys:
                assert_within(saved[mode], key)
    combination = first["transformer"]["combination"]
    assert set(combination) == {
        "deprojector_cosine",
        "blend_cosine",
        "retrieval_cosine",
        "pairs",
        *(f"{key}_ci95" for key in ("deprojector_cosine", "blend_cosine", "retrieval_cosine")),
    }
    assert combination["pairs"] > 0
    assert_within(combination, "retrieval_cosine")
    # Retrieval: k chosen on a validation split of the training rows, scored like a run.
    retrieval = json.loads((metrics / "retrieval.json").read_text())
    assert [split for split, _ in chosen] == ["train", "train"]
    assert retrieval["k"] == chosen[0][1][0] and retrieval["k"] in K_CANDIDATES
    assert set(retrieval["validation"]["cosine_masked"]) <= {str(k) for k in K_CANDIDATES}
    assert retrieval["teacher_forcing"] is False
    assert retrieval["teacher_forced"] == retrieval["autoregressive"]
    assert first["retrieval"]["combination"]["retrieval_cosine"] == combination["retrieval_cosine"]
    # Which runs are within the noise of the best one, paired over test rows and prompts.
    comparison = json.loads((metrics / "comparison.json").read_text())
    cosine = comparison["autoregressive_cosine_masked"]
    best = max(names, key=lambda n: first[n]["autoregressive"]["cosine_masked"])
    assert cosine["best"] == best
    assert set(cosine["rows"]) == {"retrieval", *names} - {best}
    for name, row in cosine["rows"].items():
        low, high = row["difference_ci95"]
        assert low <= row["difference"] <= high
        assert row["within_noise"] == (low <= 0 <= high)
        assert row["difference"] <= 0 or name == "retrieval"  # row − the best run
    # Every pair of runs that are not seed replicates, and retrieval; the replicates' spread.
    headline = [n for n in names if n != "vicinity-batch-seed1"]
    assert len(comparison["pairs"]) == 2 + len(headline) * (len(headline) + 1) // 2
    pair = comparison["pairs"]["transformer vs vicinity-batch"]
    assert pair["difference"] == pytest.approx(
        first["transformer"]["autoregressive"]["cosine_masked"]
        - first["vicinity-batch"]["autoregressive"]["cosine_masked"],
        rel=1e-5,
    )
    spread = comparison["seed_spread"]
    assert list(spread) == ["vicinity-batch"]
    assert spread["vicinity-batch"]["runs"] == ["vicinity-batch", "vicinity-batch-seed1"]
    assert spread["vicinity-batch"]["seeds"] == [0, 1]
    values = [first[n]["autoregressive"]["cosine_masked"] for n in spread["vicinity-batch"]["runs"]]
    cosine_spread = spread["vicinity-batch"]["autoregressive_cosine_masked"]
    assert cosine_spread["mean"] == pytest.approx(sum(values) / 2, abs=1e-6)
    assert cosine_spread["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=1e-6)
    assert {"adherence_single", "adherence_multi"} <= set(spread["vicinity-batch"])
    assert set(comparison["adherence"]) == {"sign", "single", "multi"}
    assert set(comparison["adherence"]["single"]) == {*names, "retrieval"}
    assert set(comparison["adherence"]["multi"]) == {*names, "retrieval", "blend"}
    curve = json.loads((project / "reports" / "plots" / "cosine_per_position.json").read_text())
    assert [row["position"] for row in curve] == list(range(1, 77))
    assert set(curve[0]) == {"position", "null-baseline", "retrieval", *names}
    # Held-out pictures: every mean over prompts with its interval.
    adherence = json.loads((metrics / "adherence.json").read_text())
    for key in ("adherence", "clip_score", "all_parts", "adherence_ratio"):
        assert_within(adherence["multi"]["transformer"], key)
    # Beside the runs: retrieval's states, and for comma prompts the parts' states blended.
    assert list(adherence["single"]) == ["reference", *names, "retrieval"]
    assert list(adherence["multi"]) == ["reference", *names, "retrieval", "blend"]
    versus_blend = first["comparison"]["adherence_vs_blend"]
    assert list(versus_blend) == ["sign", "multi"]
    assert set(versus_blend["multi"]) == {*names, "retrieval"}
    # Drawn scenes as the only prompt, judged against their descriptions, per run.
    images = json.loads((metrics / "image_prompts.json").read_text())
    assert list(images) == ["reference", *names]
    assert set(images["reference"]) == {"text"}
    for name in names:
        assert set(images[name]) >= {"text", "image", "bridge", "bridges"}
        assert images[name]["image"]["prompts"] == 6
        assert_within(images[name]["image"], "adherence")
        if "image_to_text" in images[name]:
            assert_within(images[name], "image_to_text")
        # Every bridge judged on the same scenes; the run's own is the headline `image`.
        bridges = images[name]["bridges"]
        assert list(bridges) == ["none", "mean-shift", "linear", "text-projection"]
        assert bridges[images[name]["bridge"]]["adherence"] == images[name]["image"]["adherence"]


@pytest.mark.slow
def test_two_process_training_matches_one_process(project):
    """torchrun with 2 CPU processes (gloo): same global batch and seed, same loss curve."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import SMALL

    raw = {**SMALL, "train": TRAIN, "models": TINY_MODELS}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    single = train_model("vicinity-individual", params())
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            "train",
            "vicinity-individual",
        ],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    double = json.loads((project / "reports" / "train" / "vicinity-individual.json").read_text())
    assert len(double) == len(single)
    for a, b in zip(single, double, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_trains_end_to_end_through_the_cli(project, architecture):
    """`deprojector train NAME` for a run of each registered architecture at its defaults
    (shaped by the base model), one epoch on the small shards."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.conftest import SMALL

    run = f"my-{architecture}"
    raw = {**SMALL, "train": {**TRAIN, "epochs": 1}, "models": {run: {"type": architecture}}}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", run])
    assert result.exit_code == 0, result.output
    model = load_deprojector(project / "models" / run)
    assert model.model_type == architecture
    history = json.loads((project / "reports" / "train" / f"{run}.json").read_text())
    assert len(history) == 1 and math.isfinite(history[0]["test_loss"])
    assert torch.isfinite(model.generate(torch.randn(2, model.config.hidden_size))).all()


def test_free_running_rollout_trains_on_own_predictions(project, monkeypatch):
    """train.rollout: k extra passes whose inputs are the previous pass's predictions."""
    from pipeline.models.base import Deprojector

    seen = []
    real_forward = Deprojector.forward

    def spy(self, embeds, hidden):
        seen.append(hidden)
        return real_forward(self, embeds, hidden)

    monkeypatch.setattr(Deprojector, "forward", spy)
    history = train_model("vicinity-batch", params(epochs=1, rollout=2))
    assert math.isfinite(history[0]["train_loss"])
    # Each training step: the true states, then two passes on the model's own predictions.
    first, second, third = seen[:3]
    assert not first.requires_grad
    assert not torch.equal(second, first) and not torch.equal(third, second)
    assert not second.requires_grad and not third.requires_grad  # truncated gradient


def test_a_run_may_override_train_settings(project):
    runs = {"vb-free": {"type": "vicinity-batch", "norm": "layer", "train": {"rollout": 1}}}
    p = params(runs)
    assert p.models["vb-free"].train == {"rollout": 1}
    assert train_module.run_train_params("vb-free", p).rollout == 1
    assert p.train.rollout == 0  # the other runs keep the global setting
    with pytest.raises(ParamsError, match=r"`models\.vb-free\.train\.rollouts`"):
        params({"vb-free": {"type": "vicinity-batch", "train": {"rollouts": 1}}})
    bad = params({"vb-free": {"type": "vicinity-batch", "train": {"rollout": -1}}})
    with pytest.raises(ParamsError, match=r"models\.vb-free\.train: .*`train\.rollout`"):
        train_model("vb-free", bad)


def test_a_cut_checkpoint_is_ignored_and_training_starts_over(project, capsys):
    checkpoint = project / "data" / "checkpoints" / "vicinity-batch.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"fingerprint": "x", "model": {"w": torch.zeros(1000)}}, checkpoint)
    assert train_module.read_checkpoint(checkpoint, "cpu") is None  # keys missing
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    assert train_module.read_checkpoint(checkpoint, "cpu") is None
    history = train_model("vicinity-batch", params(epochs=1))
    assert [h["epoch"] for h in history] == [1]
    assert (
        f"vicinity-batch: {checkpoint.relative_to(project)} is incomplete or corrupt; "
        "starting over" in capsys.readouterr().out
    )
