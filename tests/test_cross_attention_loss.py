"""`train.loss`: the states loss and the error in the base UNet's cross-attention keys and
values (pipeline/metrics/cross_attention.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config.params import ParamsError, parse_params
from pipeline.metrics.cross_attention import (
    cross_attention_mse,
    cross_attention_weights,
    load_cross_attention_metric,
    metric_of,
    training_loss,
)
from pipeline.metrics.losses import weighted_mse
from tests.conftest import small_params
from tests.test_models import D, N, embeds, make_model, tiny


class FakeUNet(nn.Module):
    """Cross-attention layers (attn2 with to_k / to_v) of the given weights, and a
    self-attention layer (attn1) the loss must not read."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        blocks = []
        for wk, wv in weights:
            block = nn.Module()
            for attn, (k, v) in (
                ("attn1", (torch.randn(D, D), torch.randn(D, D))),
                ("attn2", (wk, wv)),
            ):
                module = nn.Module()
                module.to_k = nn.Linear(D, k.shape[0], bias=False)
                module.to_v = nn.Linear(D, v.shape[0], bias=False)
                with torch.no_grad():
                    module.to_k.weight.copy_(k)
                    module.to_v.weight.copy_(v)
                setattr(block, attn, module)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(4, N, D, generator=g), torch.randn(4, N, D, generator=g)
    mask = torch.zeros(4, N)
    for row, length in enumerate((3, 10, 40, N)):
        mask[row, :length] = 1
    return pred, target, mask


def test_identity_projections_give_the_states_loss() -> None:
    eye = torch.eye(D)
    for layers in ([(eye, eye)], [(eye, eye)] * 3):
        metric = metric_of(cross_attention_weights(FakeUNet(layers)))
        torch.testing.assert_close(metric, torch.eye(D), atol=1e-6, rtol=0)
        pred, target, mask = batch()
        torch.testing.assert_close(
            cross_attention_mse(pred, target, mask, metric, 25.0),
            weighted_mse(pred, target, mask, 25.0),
            atol=1e-6,
            rtol=1e-6,
        )
    # Orthogonal projections preserve lengths, so they give it too.
    q = torch.linalg.qr(torch.randn(D, D))[0]
    metric = metric_of(cross_attention_weights(FakeUNet([(q, q.T)])))
    pred, target, mask = batch(1)
    torch.testing.assert_close(
        cross_attention_mse(pred, target, mask, metric),
        weighted_mse(pred, target, mask),
        atol=1e-5,
        rtol=1e-5,
    )


def test_it_is_the_error_of_the_projected_states() -> None:
    """d' G_hat d / D = |W pred - W target|^2 / |W|_F^2 (W: every attn2's to_k and to_v,
    stacked; attn1 is not read), position-weighted as the states loss."""
    torch.manual_seed(0)
    layers = [(torch.randn(40, D), torch.randn(40, D)), (torch.randn(64, D), torch.randn(64, D))]
    unet = FakeUNet(layers)
    w = cross_attention_weights(unet)
    assert w.shape == (2 * (40 + 64), D)
    pred, target, mask = batch()
    projected = weighted_mse(pred @ w.T, target @ w.T, mask) * w.shape[0] / (w**2).sum()
    torch.testing.assert_close(
        cross_attention_mse(pred, target, mask, metric_of(w)), projected, atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(
        cross_attention_mse(pred, target, mask, metric_of(w)),
        weighted_mse(pred, target, mask),
        rtol=1e-2,
    )


def test_the_states_loss_is_the_weighted_squared_error_itself() -> None:
    """Existing runs (train.loss: states, the default) train on exactly the same numbers."""
    pred, target, mask = batch()
    loss = training_loss("states", 25.0)
    assert torch.equal(loss(pred, target, mask), weighted_mse(pred, target, mask, 25.0))
    with pytest.raises(ValueError, match="train.loss 'l1' is unknown"):
        training_loss("l1", 25.0)


@pytest.mark.parametrize("kind", ["cross_attention", "mix"])
@pytest.mark.parametrize("name", ["queries", "transformer", "vicinity-batch"])
def test_the_gradient_reaches_every_architecture(kind: str, name: str) -> None:
    torch.manual_seed(0)
    metric = metric_of(torch.randn(3 * D, D))
    loss = training_loss(kind, 25.0, metric=metric)
    model = make_model(name, **tiny(name)).train()
    _, target, mask = batch()
    pred = model(embeds(4), target)
    value = loss(pred, target[:, :N], mask)
    value.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(value) and value > 0
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_the_metric_of_a_diffusers_unet(base_dir) -> None:
    """Every cross-attention layer of the (micro) world's UNet, read through base.sd."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir / "sd", subfolder="unet")
    layers = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    w = cross_attention_weights(unet)
    assert len(layers) >= 2
    assert w.shape[0] == sum(m.to_k.out_features + m.to_v.out_features for m in layers)
    width = unet.config.cross_attention_dim
    metric = load_cross_attention_metric("builtin", width, base_dir=base_dir)
    assert metric.shape == (width, width)
    torch.testing.assert_close(torch.trace(metric), torch.tensor(float(width)), rtol=1e-5, atol=0)
    torch.testing.assert_close(metric, metric_of(w), atol=1e-6, rtol=0)
    from pipeline.base.files import BaseModelError

    with pytest.raises(BaseModelError, match="reads states of width"):
        load_cross_attention_metric("builtin", width + 1, base_dir=base_dir)


def test_train_loss_is_validated_by_key() -> None:
    assert small_params().train.loss == "states"
    with pytest.raises(
        ParamsError,
        match=r"`train\.loss` must be one of \('states', "
        r"'cross_attention', 'mix', 'unet'\)",
    ):
        parse_params({"train": {"loss": "l2"}})
    with pytest.raises(ParamsError, match=r"`train\.loss` must be str"):
        parse_params({"train": {"loss": 2}})
    with pytest.raises(ParamsError, match=r"`models\.q\.train\.loss` must be str"):
        parse_params({"models": {"q": {"type": "queries", "train": {"loss": 2}}}})


def test_a_runs_own_loss_is_validated_when_it_trains() -> None:
    from pipeline.training.loop import run_train_params

    params = small_params(models={"q": {"type": "queries", "train": {"loss": "l1"}}})
    with pytest.raises(ParamsError, match=r"models\.q\.train: .*`train\.loss` must be one of"):
        run_train_params("q", params)
    params = small_params(models={"q": {"type": "queries", "train": {"loss": "mix"}}})
    assert run_train_params("q", params).loss == "mix"


@pytest.mark.slow
def test_training_with_each_loss(tmp_path, base_dir, small_shards, monkeypatch) -> None:
    """`train.loss` per run through train_model on the small shards: cross_attention trains
    and early-stops on its own test loss; an explicit `states` is the default, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.training.loop import train_model
    from tests.conftest import project_dir

    work = project_dir(tmp_path, base_dir)
    shutil.copytree(small_shards.parent, work / "data")
    monkeypatch.chdir(work)
    models = {
        "default": {"type": "queries"},
        "states": {"type": "queries", "train": {"loss": "states"}},
        "xattn": {"type": "queries", "train": {"loss": "cross_attention"}},
        "mix": {"type": "vicinity-batch", "train": {"loss": "mix"}},
    }
    params = small_params(
        train={"epochs": 2, "batch_size": 16, "patience": 0, "seed": 0}, models=models
    )
    history = {name: train_model(name, params) for name in models}
    for name, runs in history.items():
        assert len(runs) == 2 and all(r["test_loss"] > 0 for r in runs), name
    assert history["states"] == history["default"]
    weights = {
        name: load_file(work / "models" / name / "model.safetensors")
        for name in ("default", "states", "xattn")
    }
    for key, value in weights["default"].items():
        assert torch.equal(value, weights["states"][key]), key
    assert history["xattn"] != history["default"]
    assert any(not torch.equal(v, weights["xattn"][k]) for k, v in weights["default"].items())
