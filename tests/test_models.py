"""Deprojector models at a tiny width (D = 32) with random weights and constants."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.models import (
    ARCHITECTURES,
    BaseMismatchError,
    Deprojector,
    ModelFileError,
    build_deprojector,
    load_deprojector,
)
from pipeline.models.base import ACTIVATIONS
from pipeline.models.transformer import TransformerDeprojector
from pipeline.models.vicinity import VicinityDeprojector

D, P, N = 32, 48, 77


def tiny(name: str) -> dict:
    """The architecture's own tiny settings (D = 32)."""
    return ARCHITECTURES[name].tiny_config()


# Every registered architecture at its tiny settings, plus variants of their options.
CASES = [(name, tiny(name)) for name in ARCHITECTURES] + [
    ("vicinity-individual", {"norm": "layer", "mlp_layers": 2, "vicinity": 5}),
    (
        "transformer",
        {
            **tiny("transformer"),
            "freeze": "qkvo",
            "position": "residual",
            "position_init_std": 0.02,
        },
    ),
    (
        "vicinity-transformer",
        {**tiny("vicinity-transformer"), "vicinity_block": "gate", "vicinity": 3},
    ),
    (
        "vicinity-transformer",
        {**tiny("vicinity-transformer"), "vicinity_block": "mlp", "num_layers": 1, "vicinity": 1},
    ),
    ("lstm", {"cell": "layernorm", "num_layers": 2}),
    ("lstm", {"num_layers": 1}),
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
    with torch.no_grad():  # weights that start at zero (vicinity blocks) as after training
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
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


def test_fast_generation_matches_naive_recomputation(model: Deprojector) -> None:
    """Each architecture's generation (key/value cache, carried state, ...) equals re-running
    the teacher-forced model on the whole prefix for every position."""
    e_rel = embeds() - model.null
    with torch.no_grad():
        fast = model.generate_states(e_rel)
        naive = model.generate_states_naive(e_rel)
    assert fast.shape == (3, N - 1, D)
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)


def test_generate_is_self_consistent(model: Deprojector) -> None:
    e = embeds()
    generated = model.generate(e)
    assert generated.shape == (3, N, D)
    torch.testing.assert_close(generated[:, 0], model.sos.expand(3, D), atol=0, rtol=0)
    with torch.no_grad():
        teacher_forced = model(e, generated)
    torch.testing.assert_close(teacher_forced, generated, atol=1e-5, rtol=0)


def test_deprojection_constant_inverts_the_projection(model: Deprojector) -> None:
    """What image prompts rely on: projected embeddings @ deprojection.T are pooled ones."""
    e = embeds()
    _, projection = make_constants()
    pooled = (e @ projection.T) @ model.deprojection.T
    torch.testing.assert_close(model.generate(pooled), model.generate(e), atol=1e-4, rtol=1e-4)


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


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: truncate(f / "model.safetensors"),
            r"model\.safetensors: incomplete or corrupt safetensors file \(.*\); save or train",
        ),
        (
            lambda f: (f / "model.safetensors").write_bytes(b""),
            r"model\.safetensors: incomplete or corrupt safetensors file \(.*header too small",
        ),
        (
            lambda f: truncate(f / "config.json"),
            r"config\.json:\d+: not valid JSON \(.*, column \d+\); "
            r"the file is incomplete or corrupt",
        ),
        (
            lambda f: (f / "config.json").write_text('{"model_type": "vicinity-batch"}'),
            r"config\.json: missing keys hidden_size, projection_size \(a vicinity-batch config",
        ),
        (
            lambda f: (f / "config.json").write_text('["vicinity-batch"]'),
            r"config\.json: expected a JSON object, found a list",
        ),
        (
            lambda f: (f / "config.json").write_text('{"model_type": "mlp", "hidden_size": 3}'),
            r"config\.json: unknown model_type 'mlp'",
        ),
        (
            lambda f: (f / "config.json").write_text(
                (f / "config.json")
                .read_text()
                .replace(f'"hidden_size": {D}', '"hidden_size": "32"')
            ),
            r"config\.json: VicinityConfig\.hidden_size must be int, got '32'",
        ),
        (
            lambda f: (f / "config.json").write_text(
                (f / "config.json").read_text().replace(f'"hidden_size": {D}', '"hidden_size": 16')
            ),
            r"model\.safetensors: its tensors do not fit .*config\.json \(.*size mismatch",
        ),
    ],
)
def test_a_damaged_deprojector_folder_names_the_file(tmp_path, damage, message) -> None:
    from pipeline.core.errors import DeprojectorError
    from pipeline.models import ModelFileError

    make_model("vicinity-batch").save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ModelFileError, match=message) as caught:
        load_deprojector(tmp_path)
    assert isinstance(caught.value, DeprojectorError)  # the CLI prints one `error:` line
    assert str(tmp_path) in str(caught.value)


def test_loading_through_the_wrong_subclass_fails(tmp_path) -> None:
    make_model("vicinity-batch").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vicinity-batch"):
        TransformerDeprojector.from_pretrained(tmp_path)


def test_check_base(tmp_path) -> None:
    model = make_model("vicinity-individual")
    model.check_base(D, P)
    model.save_pretrained(tmp_path)
    loaded = load_deprojector(tmp_path)
    with pytest.raises(
        ValueError, match=f"deprojector in {tmp_path} was trained for D={D}, base model has D=768"
    ):
        loaded.check_base(768, P)
    with pytest.raises(ValueError, match=f"trained for P={P}, base model has P=768"):
        loaded.check_base(D, 768)


# --- building and configuration ------------------------------------------------------------------


def test_registry_and_config_classes() -> None:
    assert {"transformer", "vicinity-batch", "vicinity-individual"} <= set(ARCHITECTURES)
    for name, cls in ARCHITECTURES.items():
        assert cls.model_type == name
        config = cls.config_class.from_dict(make_model(name, **tiny(name)).config.to_dict())
        assert config.model_type == name


@pytest.mark.parametrize(
    "name, hparams, match",
    [
        ("mlp", {}, "unknown architecture 'mlp'.*transformer.*vicinity-batch"),
        ("vicinity-batch", {"heads": 2}, "unknown hyperparameter 'heads'"),
        ("vicinity-batch", {"vicinity": 0}, "vicinity must be >= 1"),
        ("vicinity-batch", {"vicinity": "3"}, "vicinity must be int"),
        ("vicinity-batch", {"norm": "group"}, "norm 'group' is unknown"),
        ("vicinity-individual", {"activation": "tanhh"}, "activation 'tanhh' is unknown"),
        ("transformer", {"num_heads": 5}, "num_heads=5 must be >= 1 and divide hidden_size=32"),
        ("transformer", {"num_heads": 4, "activation": "swash"}, "activation 'swash' is unknown"),
        ("transformer", {"num_heads": 4, "freeze": "qk"}, "freeze 'qk' is unknown"),
        ("transformer", {"num_heads": 4, "position": "input"}, "position 'input' is unknown"),
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


def test_init_from_base_copies_the_last_layer() -> None:
    clip = tiny_clip()
    text_model = clip.text_model
    last = text_model.encoder.layers[-1]
    for source in (clip, text_model):  # with and without the projection wrapper
        torch.manual_seed(0)
        model = build_deprojector("transformer", D, P, make_constants()[0], base=source)
        assert (model.config.num_heads, model.config.intermediate_size) == (4, 64)
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


def test_init_from_base_checks_the_shape() -> None:
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        build_deprojector("transformer", D, P, make_constants()[0], base=tiny_clip(), num_heads=2)


@pytest.mark.parametrize(
    "freeze, frozen_names",
    [
        ("qkv", ("q_proj", "k_proj", "v_proj")),
        ("qkvo", ("q_proj", "k_proj", "v_proj", "out_proj")),
        ("none", ()),
    ],
)
def test_transformer_freeze(freeze: str, frozen_names: tuple[str, ...]) -> None:
    model = make_model("transformer", **tiny("transformer"), freeze=freeze).train()
    frozen = {id(p) for name in frozen_names for p in getattr(model, name).parameters()}
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    model(embeds(), torch.randn(3, N, D)).square().mean().backward()
    assert (model.q_proj.weight.grad is None) == (freeze != "none")
    assert (model.out_proj.weight.grad is None) == (freeze == "qkvo")
    assert model.fc1.weight.grad is not None


def transformer_reference(
    model: TransformerDeprojector, e: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """The original's block written out slot by slot with an explicit causal softmax:
    h = x + out_proj(attn(LN1(x + pos))), h = h + MLP(LN2(h)), s = LN_final(h)."""
    x = torch.cat([e[:, None], hidden[:, 1 : N - 1]], dim=1) - model.null  # [B, 76, D]
    a = model.ln1(x + model.position_embedding)
    q, k, v = model.q_proj(a), model.k_proj(a), model.v_proj(a)
    hd = D // model.n_head
    out = []
    for t in range(N - 1):
        heads = []
        for h in range(model.n_head):
            cols = slice(h * hd, (h + 1) * hd)
            scores = torch.einsum("bd,btd->bt", q[:, t, cols], k[:, : t + 1, cols]) / hd**0.5
            heads.append(torch.einsum("bt,btd->bd", scores.softmax(-1), v[:, : t + 1, cols]))
        h_t = x[:, t] + model.out_proj(torch.cat(heads, dim=-1))
        h_t = h_t + model.fc2(model.act(model.fc1(model.ln2(h_t))))
        out.append(model.ln_final(h_t))
    return torch.stack(out, dim=1)


@pytest.mark.slow
def test_transformer_matches_the_original_block() -> None:
    model = make_model("transformer", **tiny("transformer"))
    e, hidden = embeds(), torch.randn(3, N, D)
    with torch.no_grad():
        torch.testing.assert_close(
            model(e, hidden)[:, 1:], transformer_reference(model, e, hidden), atol=1e-5, rtol=0
        )
    # The position embedding starts as N(0, 1), as the original's.
    assert 0.8 < model.position_embedding.std().item() < 1.2


# --- vicinity ------------------------------------------------------------------------------------


def vicinity_reference(
    model: VicinityDeprojector, e: torch.Tensor, hidden: torch.Tensor, i: int
) -> torch.Tensor:
    """Prediction at position i written straight from docs/architectures.md, position by
    position."""
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


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] in ("vicinity-batch", "vicinity-individual")], ids=str
)
def test_vicinity_matches_per_position_reference(case: tuple[str, dict]) -> None:
    model = make_model(case[0], **case[1])
    e, hidden = embeds(), torch.randn(3, N, D)
    with torch.no_grad():
        out = model(e, hidden)
        for i in (1, 2, model.config.vicinity + 1, 40, N - 1):
            torch.testing.assert_close(
                out[:, i], vicinity_reference(model, e, hidden, i), atol=1e-5, rtol=0
            )


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


def test_activations_are_clips_by_name() -> None:
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(ACTIVATIONS["quick_gelu"](x), x * torch.sigmoid(1.702 * x))
    assert {"quick_gelu", "gelu"} <= set(ACTIVATIONS)


# --- vicinity-transformer and LSTM ---------------------------------------------------------------


@pytest.mark.parametrize("block", ["linear", "mlp", "gate"])
def test_vicinity_transformer_starts_as_clips_last_layers(block: str) -> None:
    from pipeline.models.vicinity_transformer import VicinityTransformerDeprojector

    clip = tiny_clip().text_model
    model = build_deprojector(
        "vicinity-transformer",
        D,
        P,
        make_constants()[0],
        base=clip,
        num_layers=2,
        vicinity_block=block,
    )
    assert isinstance(model, VicinityTransformerDeprojector)
    for ours, theirs in zip(model.layers, clip.encoder.layers, strict=True):
        assert torch.equal(ours.q_proj.weight, theirs.self_attn.q_proj.weight)
        assert torch.equal(ours.out_proj.bias, theirs.self_attn.out_proj.bias)
        assert torch.equal(ours.fc2.weight, theirs.mlp.fc2.weight)
        assert torch.equal(ours.ln_out.weight, clip.final_layer_norm.weight)
        # The vicinity block adds nothing yet, whatever the window holds.
        assert not ours.vicinity(torch.randn(5, D * 3)).any()


def test_vicinity_transformer_sees_embedding_and_window_only_through_its_inputs() -> None:
    model = make_model("vicinity-transformer", **tiny("vicinity-transformer"))
    e, hidden = embeds(), torch.randn(3, N, D)
    i = 30
    later = hidden.clone()
    later[:, i:] += torch.randn(3, N - i, D)  # s_i and after: causal, must not matter
    with torch.no_grad():
        out = model(e, hidden)
        torch.testing.assert_close(model(e, later)[:, :i], out[:, :i], atol=1e-6, rtol=0)
        assert not torch.allclose(model(e, later)[:, i + 1], out[:, i + 1])


def test_lstm_starts_from_the_embedding() -> None:
    model = make_model("lstm", num_layers=1)
    e = embeds()
    with torch.no_grad():
        h0, c0 = model._start(e - model.null)
    torch.testing.assert_close(h0[0], e - model.null)
    assert not c0.any()


def test_lstm_final_norm_from_clip() -> None:
    clip = tiny_clip()
    model = build_deprojector("lstm", D, P, make_constants()[0], base=clip)
    assert torch.equal(model.ln_final.weight, clip.text_model.final_layer_norm.weight)


def test_vicinity_rnn_later_states_see_only_the_window() -> None:
    model = make_model("vicinity-rnn", **tiny("vicinity-rnn"))
    v = model.config.vicinity
    e, hidden = embeds(), torch.randn(3, N, D)
    with torch.no_grad():
        out = model(e, hidden)
        other_e = model(embeds(seed=7), hidden)
    assert not torch.allclose(other_e[:, 1 : v + 1], out[:, 1 : v + 1])  # from the embedding
    torch.testing.assert_close(other_e[:, v + 1 :], out[:, v + 1 :], atol=0, rtol=0)


# --- the ensemble --------------------------------------------------------------------------------


def saved_members(folder, names=("vicinity-batch", "transformer", "lstm")) -> list[Deprojector]:
    for name in names:
        make_model(name, **tiny(name)).save_pretrained(folder / name)
    return [load_deprojector(folder / name) for name in names]


@pytest.mark.slow
def test_ensemble_feeds_every_member_the_average_of_their_states(tmp_path) -> None:
    from pipeline.models.ensemble import EnsembleDeprojector

    members = saved_members(tmp_path)
    ensemble = EnsembleDeprojector.of(members)
    x = embeds()
    e_rel = x - members[0].null
    prev = torch.zeros(3, 0, D)
    for _ in range(N - 1):  # the plain loop, written out: the members' mean is fed back
        state = torch.stack([m.predict(e_rel, prev)[:, -1] for m in members]).mean(dim=0)
        prev = torch.cat([prev, (state - members[0].null)[:, None]], dim=1)
    generated = ensemble.generate(x)
    assert torch.allclose(generated[:, 1:], prev + members[0].null, atol=1e-5)
    assert torch.equal(generated[:, 0], members[0].sos.expand(3, D))
    # Not any one member's own generation: each is steered by the others.
    for member in members:
        assert not torch.allclose(member.generate(x), generated, atol=1e-3)
    hidden = torch.randn(3, N, D)
    assert torch.allclose(
        ensemble(x, hidden), torch.stack([m(x, hidden) for m in members]).mean(dim=0), atol=1e-6
    )


@pytest.mark.slow
def test_ensemble_folders_load_their_members(tmp_path) -> None:
    import json

    from pipeline.models.ensemble import EnsembleDeprojector

    members = saved_members(tmp_path)
    x = embeds()
    expected = EnsembleDeprojector.of(members).generate(x)
    # A self-contained copy (members inside) and the train stage's folder, naming its
    # sibling runs: both load as the same ensemble.
    EnsembleDeprojector.of(members).save_pretrained(tmp_path / "copy")
    (tmp_path / "siblings").mkdir()
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["members"] = ["../vicinity-batch", "../transformer", "../lstm"]
    (tmp_path / "siblings" / "config.json").write_text(json.dumps(config))
    for folder in ("copy", "siblings"):
        loaded = load_deprojector(tmp_path / folder)
        assert isinstance(loaded, EnsembleDeprojector)
        assert torch.allclose(loaded.generate(x), expected, atol=1e-6), folder
    shutil.rmtree(tmp_path / "lstm")
    with pytest.raises(ModelFileError, match=r"member '\.\./lstm' has no deprojector"):
        load_deprojector(tmp_path / "siblings")


def test_ensemble_refuses_members_of_another_base(tmp_path) -> None:
    from pipeline.models.ensemble import EnsembleDeprojector

    members = saved_members(tmp_path, ("vicinity-batch", "lstm"))
    with torch.no_grad():
        members[1].null.add_(1.0)
    with pytest.raises(BaseMismatchError, match="different `null` constants"):
        EnsembleDeprojector.of(members)
    with pytest.raises(ValueError, match="2 or more members"):
        EnsembleDeprojector.of(members[:1])
