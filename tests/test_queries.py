"""The one-pass deprojectors at a tiny width (D = 32): `queries` (pipeline/models/queries.py)
and `latent-queries` (pipeline/models/latent_queries.py), its layers on the tokens."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config.params import parse_params
from pipeline.models import (
    ARCHITECTURES,
    build_deprojector,
    hyperparameters,
    load_deprojector,
)
from pipeline.models.base import CONFIG_FILE, WEIGHTS_FILE
from pipeline.models.ensemble import EnsembleDeprojector
from pipeline.models.latent_queries import LatentQueriesDeprojector
from pipeline.models.queries import QueriesDeprojector
from tests.test_models import D, N, P, embeds, make_constants, make_model, tiny, tiny_clip


@pytest.fixture(
    params=[
        ("queries", {}),
        ("queries", {"causal": True}),
        ("queries", {"num_tokens": 1, "num_layers": 1}),
        ("latent-queries", {}),
        ("latent-queries", {"readout_mlp": True, "num_tokens": 1, "num_layers": 1}),
    ],
    ids=["default", "causal", "one-token-one-layer", "latent", "latent-readout-mlp"],
)
def model(request) -> QueriesDeprojector:
    model_type, hparams = request.param
    return make_model(model_type, **{**tiny(model_type), **hparams})


def test_registered_with_its_hyperparameters() -> None:
    assert ARCHITECTURES["queries"] is QueriesDeprojector
    assert {"num_tokens", "num_layers", "causal", "init", "num_heads"} <= set(
        hyperparameters("queries")
    )
    spec = parse_params(
        {
            "models": {
                "q": {"type": "queries", "num_tokens": 4, "train": {"loss": "cross_attention"}}
            }
        }
    ).models["q"]
    assert (spec.type, spec.hparams, spec.train) == (
        "queries",
        {"num_tokens": 4},
        {"loss": "cross_attention"},
    )


def test_shapes(model) -> None:
    e = embeds(5)
    out = model.generate(e)
    assert out.shape == (5, N, D)
    torch.testing.assert_close(out[:, 0], model.sos.expand(5, D), atol=0, rtol=0)
    assert model.to_tokens.weight.shape == (model.config.num_tokens * D, D)
    assert model.queries.shape == model.position_embedding.shape == (N - 1, D)


def test_generation_is_the_one_forward_pass(model) -> None:
    """generate = forward (whatever previous states it is given) = states(e - null); the
    stepping path (for ensembles) yields the same states and ignores what it is sent."""
    e = embeds()
    with torch.no_grad():
        one_pass = model.states(e - model.null)
        forced = model(e, torch.randn(3, N, D))
        forced_other = model(e, torch.zeros(3, N, D))
        steps = model.generation_steps(e - model.null)
        stepped = [next(steps)] + [steps.send(torch.randn(3, D)) for _ in range(N - 2)]
    generated = model.generate(e)
    torch.testing.assert_close(generated[:, 1:], one_pass, atol=0, rtol=0)
    torch.testing.assert_close(forced, generated, atol=0, rtol=0)
    torch.testing.assert_close(forced_other, generated, atol=0, rtol=0)
    torch.testing.assert_close(torch.stack(stepped, dim=1), one_pass, atol=0, rtol=0)
    with pytest.raises(StopIteration):
        steps.send(torch.randn(3, D))


def test_every_state_depends_on_the_embedding(model) -> None:
    e = embeds()
    a, b = model.generate(e), model.generate(e + 0.5 * torch.randn_like(e))
    assert ((a[:, 1:] - b[:, 1:]).abs().amax(dim=-1) > 1e-4).all()


def test_causal_queries_do_not_see_later_positions() -> None:
    model = make_model("queries", **tiny("queries"), causal=True)
    e_rel = embeds() - model.null
    with torch.no_grad():
        before = model.states(e_rel)
        model.queries[40:] += 1.0
        after = model.states(e_rel)
    torch.testing.assert_close(after[:, :40], before[:, :40], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 40:], before[:, 40:])


def test_save_load_round_trip(model, tmp_path) -> None:
    model.save_pretrained(tmp_path / "q")
    assert {p.name for p in (tmp_path / "q").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    config = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert config["model_type"] == model.config.model_type
    assert config["num_tokens"] == model.config.num_tokens
    loaded = load_deprojector(tmp_path / "q")
    assert type(loaded) is type(model) and loaded.config == model.config
    e = embeds()
    torch.testing.assert_close(loaded.generate(e), model.generate(e), atol=0, rtol=0)


def test_starts_from_clips_last_layers() -> None:
    clip = tiny_clip()
    text = clip.text_model
    torch.manual_seed(0)
    model = build_deprojector("queries", D, P, make_constants()[0], base=clip, num_layers=2)
    assert (model.config.num_heads, model.config.intermediate_size) == (4, 64)
    for ours, theirs in zip(model.layers, text.encoder.layers[-2:], strict=True):
        assert torch.equal(ours.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)
        assert torch.equal(ours.self_attn.out_proj.bias, theirs.self_attn.out_proj.bias)
        assert torch.equal(ours.fc2.weight, theirs.mlp.fc2.weight)
        assert torch.equal(ours.ln2.weight, theirs.layer_norm2.weight)
        assert not ours.cross_attn.out_proj.weight.any()
    assert torch.equal(model.ln_final.weight, text.final_layer_norm.weight)
    assert torch.equal(model.position_embedding, text.embeddings.position_embedding.weight[1:N])
    # o_k = 0: at the start every embedding gets the same states, CLIP's last layers run on
    # the position embeddings.
    out = model.eval().generate(embeds())
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)
    fresh = build_deprojector("queries", D, P, make_constants()[0], base=clip, init="fresh")
    assert not torch.equal(fresh.layers[-1].fc2.weight, text.encoder.layers[-1].mlp.fc2.weight)


@pytest.mark.parametrize("readout_mlp", [False, True])
def test_latent_queries_start_from_clips_last_layers_on_the_tokens(readout_mlp) -> None:
    """Latent layer k is CLIP's (N-k)-th from last; the read (and the readout MLP's last
    layer) start at zero: every embedding gets LN_final(pos), the states of `queries` at
    initialisation too."""
    clip = tiny_clip()
    text = clip.text_model
    torch.manual_seed(0)
    model = build_deprojector(
        "latent-queries", D, P, make_constants()[0], base=clip, readout_mlp=readout_mlp
    )
    assert ARCHITECTURES["latent-queries"] is LatentQueriesDeprojector
    for ours, theirs in zip(model.layers, text.encoder.layers[-2:], strict=True):
        assert torch.equal(ours.self_attn.v_proj.weight, theirs.self_attn.v_proj.weight)
        assert torch.equal(ours.fc1.bias, theirs.mlp.fc1.bias)
        assert not hasattr(ours, "cross_attn")
    assert not model.read.out_proj.weight.any()
    assert (model.readout is not None) is readout_mlp
    out = model.eval().generate(embeds())
    start = text.final_layer_norm(text.embeddings.position_embedding.weight[1:N])
    torch.testing.assert_close(out[0, 1:], start, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=0)


def test_latent_queries_positions_read_only_the_tokens() -> None:
    """No attention among the 76 queries: changing later queries leaves earlier states."""
    model = make_model("latent-queries", **tiny("latent-queries"))
    e_rel = embeds() - model.null
    with torch.no_grad():
        before = model.states(e_rel)
        model.queries[40:] += 1.0
        after = model.states(e_rel)
    torch.testing.assert_close(after[:, :40], before[:, :40], atol=0, rtol=0)
    assert not torch.allclose(after[:, 40:], before[:, 40:])


@pytest.mark.parametrize(
    "hparams, match",
    [
        ({"num_tokens": 0}, "num_tokens must be >= 1"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"init": "clip-l"}, "init 'clip-l' is unknown"),
        ({"causal": "yes"}, "causal must be bool"),
        ({"queries": 76}, "unknown hyperparameter 'queries'"),
    ],
)
def test_bad_hyperparameters_are_named(hparams, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_deprojector("queries", D, P, make_constants()[0], **{**tiny("queries"), **hparams})


def test_an_ensemble_member(tmp_path) -> None:
    """The ensemble steps its members; a queries member yields its one-pass states."""
    q = make_model("queries", **tiny("queries"))
    v = make_model("vicinity-batch", **tiny("vicinity-batch"))
    ensemble = EnsembleDeprojector.of([q, v], ["q", "v"])
    e = embeds()
    with torch.no_grad():
        fast = ensemble.generate_states(e - q.null)
        naive = ensemble.generate_states_naive(e - q.null)
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
