"""The fine-tune through the frozen UNet (`train.loss: unet`, `train.unet_epochs`;
pipeline/metrics/unet_loss.py) and scheduled sampling with the model's own generation
(`train.scheduled_sampling`), as the training loop feeds them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.config.params import ParamsError, parse_params
from pipeline.metrics.unet_loss import UnetLoss
from pipeline.training.loop import UNET, fed_back, own_states
from tests.conftest import project_dir, small_params
from tests.test_models import CASE_IDS, CASES, N, embeds, make_model


@pytest.fixture
def unet_loss(tmp_path, base_dir, monkeypatch) -> UnetLoss:
    monkeypatch.chdir(project_dir(tmp_path, base_dir))
    return UnetLoss("builtin", "builtin", replace(small_params().render, steps=3))


def states(loss: UnetLoss, rows: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, N, loss.negative.shape[-1], generator=g)


def test_the_true_states_score_zero_and_only_the_prediction_gets_a_gradient(unet_loss) -> None:
    target = states(unet_loss)
    assert unet_loss(target.clone(), target) == 0
    pred = (target + 0.3 * states(unet_loss, seed=1)).requires_grad_(True)
    value = unet_loss(pred, target, generator=torch.Generator().manual_seed(0))
    value.backward()
    assert value > 0 and pred.grad is not None and pred.grad.abs().sum() > 0
    unet = unet_loss.pipe.unet
    assert not unet.training and all(p.grad is None for p in unet.parameters())


def test_its_draws_come_from_the_generator(unet_loss) -> None:
    """The same generator seed: the same step and noise, so the same loss (the test loss
    early stopping compares); torch's global generator otherwise."""
    target = states(unet_loss)
    pred = target + 0.3 * states(unet_loss, seed=1)
    again = [unet_loss(pred, target, generator=torch.Generator().manual_seed(5)) for _ in "ab"]
    assert torch.equal(*again)
    seeds = [torch.Generator().manual_seed(seed) for seed in range(6)]
    values = {unet_loss(pred, target, generator=g).item() for g in seeds}
    assert len(values) > 1
    with pytest.raises(ValueError, match="differ in shape"):
        unet_loss(pred[:, :10], target)


def test_guidance_is_what_sampling_uses(unet_loss) -> None:
    assert unet_loss.scale == small_params().render.guidance_scale > 1
    assert unet_loss.visited == len(unet_loss.pipe.scheduler.timesteps)


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
def test_fed_back_generation_gives_the_generated_states(name, hparams) -> None:
    """A teacher-forced pass on the model's own generation outputs that generation: what
    the `unet` loss and scheduled sampling train on is what the UNet reads."""
    model = make_model(name, **hparams)
    e = embeds(4)
    torch.testing.assert_close(model(e, own_states(model, e)), model.generate(e))
    model.train()
    own_states(model, e)
    assert model.training  # the mode is given back


def test_scheduled_sampling_feeds_a_share_of_the_rows_their_own_generation() -> None:
    model = make_model("vicinity-batch")
    e, hidden = embeds(64), torch.randn(64, N, model.config.hidden_size)
    assert fed_back(model, e, hidden, "states", 0.0) is hidden
    generated = model.generate(e)
    torch.testing.assert_close(fed_back(model, e, hidden, "states", 1.0), generated)
    torch.testing.assert_close(fed_back(model, e, hidden, UNET, 0.0), generated)
    torch.manual_seed(0)
    mixed = fed_back(model, e, hidden, "states", 0.5)
    own = (mixed - generated).abs().amax(dim=(1, 2)) < 1e-6
    true = (mixed - hidden).abs().amax(dim=(1, 2)) == 0
    assert torch.all(own ^ true) and 16 < own.sum() < 48


def test_the_settings_are_checked() -> None:
    assert small_params().train.unet_epochs == 0
    for train, message in (
        ({"loss": "unet", "unet_epochs": 1}, r"`train\.unet_epochs` must be 0, or the epochs"),
        ({"unet_epochs": -1}, r"`train\.unet_epochs` must be"),
        ({"unet_lr": 0}, r"`train\.unet_lr` must be positive"),
        ({"unet_rows": 0}, r"`train\.unet_rows` must be a positive integer"),
        ({"scheduled_sampling": 1.5}, r"`train\.scheduled_sampling` must be a share"),
    ):
        with pytest.raises(ParamsError, match=message):
            parse_params({"train": train})


@pytest.mark.slow
def test_a_fine_tune_through_the_unet(tmp_path, base_dir, small_shards, monkeypatch) -> None:
    """train.unet_epochs: the states epochs as without it, then the fine-tune from their best
    epoch, its entries marked in the history."""
    import shutil

    from pipeline.training.loop import train_model

    work = project_dir(tmp_path, base_dir)
    shutil.copytree(small_shards.parent, work / "data")
    monkeypatch.chdir(work)
    models = {
        "states": {"type": "vicinity-batch"},
        "tuned": {"type": "vicinity-batch", "train": {"unet_epochs": 1, "unet_rows": 4}},
    }
    params = small_params(
        train={"epochs": 2, "batch_size": 16, "patience": 0, "seed": 0},
        render={"steps": 3},
        models=models,
    )
    states = train_model("states", params)
    tuned = train_model("tuned", params)
    assert tuned[:2] == states and tuned[2]["phase"] == UNET and tuned[2]["epoch"] == 3
    assert tuned[2]["test_loss"] > 0 and (work / "models/tuned/model.safetensors").is_file()
