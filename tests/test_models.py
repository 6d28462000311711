"""Deprojector models at a tiny width (D = 32) with random weights and constants."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import (
    MODELS,
    Deprojector,
    TransformerDeprojector,
    VicinityDeprojector,
    build_deprojector,
    load_deprojector,
)
from pipeline.models.base import ACTIVATIONS

D, P, N = 32, 48, 77
HPARAMS = {
    "transformer": {"num_heads": 4, "intermediate_size": 64},
    "vicinity-batch": {},
    "vicinity-individual": {},
}
# Every registered model plus a vicinity model with the other norm, more layers, a wider window.
CASES = [(name, HPARAMS[name]) for name in MODELS] + [
    ("vicinity-individual", {"norm": "layer", "mlp_layers": 2, "vicinity": 5}),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def make_constants(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random sos/null and a deprojection that exactly inverts a random projection W [P, D]."""
    g = torch.Generator().manual_seed(seed)
    projection = torch.randn(P, D, generator=g)
    constants = {
        "sos": torch.randn(D, generator=g),
        "null": torch.randn(D, generator=g),
        "deprojection": torch.linalg.pinv(projection),
    }
    return constants, projection


def make_model(name: str, **hparams: object) -> Deprojector:
    torch.manual_seed(0)
    model = build_deprojector(name, D, P, make_constants()[0], **hparams)
    # One training-mode pass so BatchNorm running statistics are not the identity.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, D), torch.randn(8, N, D))
    return model.eval()


@pytest.fixture(params=CASES, ids=CASE_IDS)
def model(request: pytest.FixtureRequest) -> Deprojector:
    name, hparams = request.param
    return make_model(name, **hparams)


def embeds(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))


# --- generation ----------------------------------------------------------------------------------


def test_kv_cache_matches_naive_generation() -> None:
    model = make_model("transformer", **HPARAMS["transformer"])
    e_rel = embeds() - model.null
    with torch.no_grad():
        cached = model.generate_states(e_rel)
        naive = model.generate_states_naive(e_rel)
    assert cached.shape == (3, N - 1, D)
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=0)


def test_generate_is_self_consistent(model: Deprojector) -> None:
    e = embeds()
    generated = model.generate(e)
    assert generated.shape == (3, N, D)
    torch.testing.assert_close(generated[:, 0], model.sos.expand(3, D), atol=0, rtol=0)
    with torch.no_grad():
        teacher_forced = model(e, generated)
    torch.testing.assert_close(teacher_forced, generated, atol=1e-5, rtol=0)


def test_from_projected_inverts_the_projection(model: Deprojector) -> None:
    e = embeds()
    _, projection = make_constants()
    from_projected = model.generate(e @ projection.T, from_projected=True)
    torch.testing.assert_close(from_projected, model.generate(e), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((2, D), float("nan")), "NaN"),
        (torch.full((2, D), float("inf")), "Inf"),
        (torch.zeros(2, D + 1), rf"\[B, {D}\]"),
        (torch.zeros(D), rf"\[B, {D}\]"),
    ],
)
def test_generate_rejects_bad_embeddings(bad: torch.Tensor, match: str) -> None:
    model = make_model("vicinity-batch")
    with pytest.raises(ValueError, match=match):
        model.generate(bad)


def test_from_projected_checks_the_projected_width() -> None:
    model = make_model("vicinity-batch")
    with pytest.raises(ValueError, match=rf"projected embeds must have shape \[B, {P}\]"):
        model.generate(torch.zeros(2, D), from_projected=True)


def test_forward_checks_hidden_shape() -> None:
    model = make_model("vicinity-batch")
    with pytest.raises(ValueError, match=rf"\[B, {N}, {D}\]"):
        model(embeds(), torch.zeros(3, N - 1, D))


# --- saving and loading --------------------------------------------------------------------------


def test_save_and_load_round_trip(model: Deprojector, tmp_path) -> None:
    model.save_pretrained(tmp_path / "dp")
    assert (tmp_path / "dp" / "config.json").is_file()
    assert (tmp_path / "dp" / "model.safetensors").is_file()
    loaded = load_deprojector(tmp_path / "dp")
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert not loaded.training
    e = embeds()
    hidden = torch.randn(3, N, D)
    assert torch.equal(loaded.generate(e), model.generate(e))
    with torch.no_grad():
        assert torch.equal(loaded(e, hidden), model(e, hidden))
    assert type(Deprojector.from_pretrained(tmp_path / "dp")) is type(model)


def test_loading_reports_the_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_deprojector(tmp_path)
    make_model("vicinity-batch").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*model.safetensors"):
        load_deprojector(tmp_path)


def test_loading_through_the_wrong_subclass_fails(tmp_path) -> None:
    make_model("vicinity-batch").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vicinity-batch"):
        TransformerDeprojector.from_pretrained(tmp_path)


def test_check_base(tmp_path) -> None:
    model = make_model("vicinity-individual")
    model.check_base(D, P)
    model.save_pretrained(tmp_path)
    loaded = load_deprojector(tmp_path)
    with pytest.raises(ValueError, match=f"deprojector in {tmp_path} was trained for D={D}, "
                       "base model has D=768"):
        loaded.check_base(768, P)
    with pytest.raises(ValueError, match=f"trained for P={P}, base model has P=768"):
        loaded.check_base(D, 768)


# --- building and configuration ------------------------------------------------------------------


def test_registry_and_config_classes() -> None:
    assert set(MODELS) == {"transformer", "vicinity-batch", "vicinity-individual"}
    for name, cls in MODELS.items():
        assert cls.model_type == name
        config = cls.config_class.from_dict(make_model(name, **HPARAMS[name]).config.to_dict())
        assert config.model_type == name


@pytest.mark.parametrize(
    "name, hparams, match",
    [
        ("mlp", {}, "unknown deprojector 'mlp'.*transformer, vicinity-batch"),
        ("vicinity-batch", {"heads": 2}, "unknown hyperparameter 'heads'"),
        ("vicinity-batch", {"vicinity": 0}, "vicinity must be >= 1"),
        ("vicinity-batch", {"vicinity": "3"}, "vicinity must be int"),
        ("vicinity-batch", {"norm": "group"}, "norm 'group' is unknown"),
        ("vicinity-individual", {"activation": "tanh"}, "activation 'tanh' is unknown"),
        ("transformer", {"num_heads": 5}, "num_heads=5 must be >= 1 and divide hidden_size=32"),
        ("transformer", {"num_heads": 4, "activation": "swish"}, "activation 'swish' is unknown"),
    ],
)
def test_build_rejects_bad_hyperparameters(name: str, hparams: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_deprojector(name, D, P, make_constants()[0], **hparams)


def test_build_checks_constants() -> None:
    constants = make_constants()[0]
    with pytest.raises(ValueError, match="constants must be exactly"):
        build_deprojector("vicinity-batch", D, P, {"sos": constants["sos"]})
    constants["null"] = torch.zeros(D + 1)
    with pytest.raises(ValueError, match=rf"constant null must have shape \({D},\)"):
        build_deprojector("vicinity-batch", D, P, constants)


# --- transformer ---------------------------------------------------------------------------------


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=D,
        vocab_size=100,
        max_position_embeddings=N,
    )
    return CLIPTextModelWithProjection(config).eval()


def test_init_from_clip_copies_the_last_layer() -> None:
    clip = tiny_clip()
    text_model = clip.text_model
    last = text_model.encoder.layers[-1]
    for source in (clip, text_model):  # with and without the projection wrapper
        model = make_model("transformer", **HPARAMS["transformer"])
        model.init_from_clip(source)
        pairs = [
            (model.ln1.weight, last.layer_norm1.weight),
            (model.q_proj.weight, last.self_attn.q_proj.weight),
            (model.v_proj.bias, last.self_attn.v_proj.bias),
            (model.out_proj.weight, last.self_attn.out_proj.weight),
            (model.fc1.weight, last.mlp.fc1.weight),
            (model.fc2.bias, last.mlp.fc2.bias),
            (model.ln_final.weight, text_model.final_layer_norm.weight),
        ]
        for ours, theirs in pairs:
            assert torch.equal(ours, theirs)
        assert not model.q_proj.weight.requires_grad  # still frozen after the copy


def test_init_from_clip_checks_the_shape() -> None:
    model = make_model("transformer", num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        model.init_from_clip(tiny_clip())


def test_freeze_attention() -> None:
    model = make_model("transformer", **HPARAMS["transformer"]).train()
    attention = [model.q_proj, model.k_proj, model.v_proj, model.out_proj]
    frozen = {id(p) for module in attention for p in module.parameters()}
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    model(embeds(), torch.randn(3, N, D)).square().mean().backward()
    assert model.q_proj.weight.grad is None
    assert model.fc1.weight.grad is not None
    unfrozen = make_model("transformer", freeze_attention=False, **HPARAMS["transformer"])
    assert all(p.requires_grad for p in unfrozen.parameters())


# --- vicinity ------------------------------------------------------------------------------------


def vicinity_reference(model: VicinityDeprojector, e: torch.Tensor, hidden: torch.Tensor,
                       i: int) -> torch.Tensor:
    """Prediction at position i written straight from SPEC 2.2 / 2.3, one position at a time."""
    v, null = model.config.vicinity, model.null
    zero = torch.zeros_like(e)
    window = [hidden[:, i - k] - null if i - k >= 1 else zero for k in range(1, v + 1)]
    if model.model_type == "vicinity-batch":
        x = model.proj(model.act(model.mix(torch.cat([e - null, *window], dim=1))))
    else:
        a_e = model.act(model.embed_proj(e - null))
        a_s = [model.act(model.state_proj(s)) for s in window]
        x = model.mix(torch.cat([a_e, *a_s], dim=1))
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "transformer"], ids=str)
def test_vicinity_matches_per_position_reference(case: tuple[str, dict]) -> None:
    model = make_model(case[0], **case[1])
    e, hidden = embeds(), torch.randn(3, N, D)
    with torch.no_grad():
        out = model(e, hidden)
        for i in (1, 2, model.config.vicinity + 1, 40, N - 1):
            torch.testing.assert_close(out[:, i], vicinity_reference(model, e, hidden, i),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vicinity-batch", "vicinity-individual"])
def test_vicinity_sees_only_its_window(name: str) -> None:
    model = make_model(name)
    v, i = model.config.vicinity, 20
    e, hidden = embeds(), torch.randn(3, N, D)
    outside = hidden.clone()
    outside[:, : i - v] += torch.randn(3, i - v, D)  # s_0 (sos) .. s_{i-v-1}
    outside[:, i:] += torch.randn(3, N - i, D)  # s_i ..
    inside = hidden.clone()
    inside[:, i - v] += 1.0  # s_{i-v}, the oldest state in the window
    with torch.no_grad():
        out = model(e, hidden)
        torch.testing.assert_close(model(e, outside)[:, i], out[:, i], atol=0, rtol=0)
        assert not torch.allclose(model(e, inside)[:, i], out[:, i])
        # Position 1 sees only zero stand-ins: no hidden state at all.
        torch.testing.assert_close(model(e, outside)[:, 1], out[:, 1], atol=0, rtol=0)


def test_activations_include_quick_gelu() -> None:
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(ACTIVATIONS["quick_gelu"](x), x * torch.sigmoid(1.702 * x))
