"""The embedded world: scenes and captions, prompt parsing, the judge's arithmetic, and a
micro-world whose folders load like the real CLIP ViT-L/14 and SD 1.5 ones."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from pipeline.base.loaders import load_sd_pipeline
from pipeline.config.params import SCHEDULERS, WORLD_PROMPTS_MULTI, WORLD_PROMPTS_SINGLE
from pipeline.world import loop
from pipeline.world import scenes as world
from pipeline.world.build import MICRO, WorldBuild, build_micro_world
from pipeline.world.clip import pixels
from pipeline.world.judge import Judge, found_fraction


def test_scenes_are_deterministic_and_keep_their_ground_truth():
    images, scenes = world.draw_scenes(20, seed=3)
    again, same = world.draw_scenes(20, seed=3)
    assert np.array_equal(images, again) and scenes == same
    # More scenes of a seed extend the fewer (world.unet_scenes extends the CLIP's scenes).
    more, extended = world.draw_scenes(27, seed=3)
    assert np.array_equal(more[:20], images) and extended[:20] == scenes
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    for image, scene in zip(images, scenes, strict=True):
        assert 1 <= len(scene.things) <= 3
        assert all(t.color != scene.background for t in scene.things)
        # The corner pixel is background: no object reaches the corners.
        assert tuple(image[0, 0]) == world.COLORS[scene.background]
        for thing in scene.things:  # each object's colour is drawn at its centre
            x, y = world.PLACES[thing.place]
            centre = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(int)
            assert (np.abs(centre - world.COLORS[thing.color]).sum(1) < 60).any(), thing


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31))
def test_every_caption_states_only_what_its_scene_has(seed):
    rng = random.Random(seed)
    scene = world.random_scene(rng)
    text = world.caption(scene, rng)
    stated = world.parse_prompt(text)
    required = world.required_bits(stated)
    assert required & world.scene_bits(scene) == required, (text, scene)


@pytest.mark.parametrize(
    "prompt, background, objects",
    [
        ("red circle", None, [("red", "circle")]),
        ("red, circle", None, [("red", "circle")]),
        ("star, yellow, big, black background", "black", [("yellow", "star")]),
        ("big yellow star black background", "black", [("yellow", "star")]),
        (
            "a big red circle left of a small blue square on a white background",
            "white",
            [("red", "circle"), ("blue", "square")],
        ),
        ("yellow star, black background", "black", [("yellow", "star")]),
        ("a red circle and a blue square", None, [("red", "circle"), ("blue", "square")]),
        ("circle", None, [(None, "circle")]),
        ("green", None, [("green", None)]),
        ("big", None, []),
    ],
)
def test_prompts_of_every_style_parse_into_their_attributes(prompt, background, objects):
    stated = world.parse_prompt(prompt)
    assert (stated.background, stated.objects) == (background, objects)


def test_grid_prompts_and_their_parts_are_world_captions():
    captions = set(world.generate_captions(50_000, seed=1))
    for prompt in WORLD_PROMPTS_SINGLE:
        assert world.parse_prompt(prompt).count() > 0
    for prompt in WORLD_PROMPTS_MULTI:
        for part in prompt.split(","):
            assert part.strip() in captions, part


def test_found_fraction_counts_stated_attributes():
    seen = world.Stated("white", [("red", "circle"), ("blue", "square")])
    assert found_fraction(seen, world.parse_prompt("red circle blue square white background")) == 1
    assert found_fraction(seen, world.parse_prompt("red square, white background")) == 0.5
    # Loose parts bind (`blue, circle` is a blue circle), and there is none.
    assert found_fraction(seen, world.parse_prompt("blue, circle")) == 0
    assert found_fraction(seen, world.parse_prompt("circle")) == 1
    assert found_fraction(seen, world.parse_prompt("green star black background")) == 0
    assert found_fraction(seen, world.parse_prompt("big")) == 1  # nothing stated


def test_ratios_to_the_reference_row():
    from pipeline.metrics.adherence import with_ratios

    rows = with_ratios(
        {
            "reference": {"adherence": 0.5, "clip_score": 20.0},
            "model": {"adherence": 0.25, "clip_score": 30.0},
        }
    )
    assert rows["reference"]["adherence_ratio"] == 1.0
    assert rows["model"]["adherence_ratio"] == 0.5 and rows["model"]["clip_score_ratio"] == 1.5
    # A reference that shows nothing gives no ratio (not a division by zero).
    assert "adherence_ratio" not in with_ratios({"reference": {"adherence": 0.0}})["reference"]


def test_micro_world_loads_like_clip_vit_l_and_sd(base_dir):
    clip_dir = base_dir / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    full = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModelWithProjection.from_pretrained(clip_dir)
    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    assert text.config.eos_token_id == tokenizer.eos_token_id
    assert text.config.projection_dim == text.config.hidden_size  # square, as CLIP-L
    torch.testing.assert_close(text.text_projection.weight, full.text_projection.weight)
    torch.testing.assert_close(vision.visual_projection.weight, full.visual_projection.weight)
    images, _ = world.draw_scenes(3, seed=0)
    processed = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(processed, pixels(images), atol=1e-5, rtol=0)
    # SD's text encoder is a CLIPTextModel with the same weights.
    encoder = CLIPTextModel.from_pretrained(base_dir / "sd" / "text_encoder")
    torch.testing.assert_close(
        encoder.final_layer_norm.weight, text.text_model.final_layer_norm.weight
    )
    Judge.from_pretrained(base_dir / "judge")


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_render_scheduler_runs_on_the_world_pipeline(base_dir, scheduler):
    import diffusers

    pipe = load_sd_pipeline("builtin", base_dir=base_dir)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    image = pipe(
        "red circle",
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)  # the UNet's sample size x the VAE's factor 4


def test_ddim_does_not_clip_the_latents(base_dir):
    """SD 1.5's scheduler config says clip_sample: false; DDIM's default (true) would clip its
    x0 estimates to [-1, 1] although scaled latents have unit std (adherence fell to 0.15)."""
    from diffusers import DDIMScheduler

    pipe = load_sd_pipeline("builtin", base_dir=base_dir)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    assert ddim.config.clip_sample is False
    ddim.set_timesteps(10)
    sample = torch.full((1, 4, 8, 8), 3.0)
    # Zero predicted noise: x0 = x_t / sqrt(alpha_bar_t), far outside [-1, 1], kept unclipped.
    step = ddim.step(torch.zeros_like(sample), ddim.timesteps[0], sample)
    assert step.pred_original_sample.abs().max() > 2.9


@pytest.mark.slow
def test_world_build_is_deterministic_and_independent_of_jobs(tmp_path, base_dir):
    build_micro_world(tmp_path / "world", seed=0, jobs=2)  # base_dir: jobs=1
    for name in (
        "clip/model.safetensors",
        "clip/tokenizer.json",
        "judge/model.safetensors",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "sd/vae/diffusion_pytorch_model.safetensors",
        "world.json",
    ):
        digests = [
            hashlib.sha256((d / name).read_bytes()).hexdigest()
            for d in (tmp_path / "world", base_dir)
        ]
        assert digests[0] == digests[1], name


def test_an_interrupted_part_resumes_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CHECKPOINT_EVERY", 2)
    p = dataclasses.replace(MICRO, vae_steps=6)
    clean = WorldBuild(p, tmp_path / "clean")
    clean.run(("vae",))

    interrupted = WorldBuild(p, tmp_path / "interrupted")
    real = loop.train_steps

    def crash_at_step_5(*args, **kwargs):
        step_fn = args[5]

        def crashing(step):
            if step == 5:
                raise KeyboardInterrupt
            return step_fn(step)

        return real(*args[:5], crashing, *args[6:], **kwargs)

    monkeypatch.setattr("pipeline.world.vae.train_steps", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(("vae",))
    assert interrupted.checkpoint("vae").exists() and not interrupted.done("vae")
    monkeypatch.setattr("pipeline.world.vae.train_steps", real)
    interrupted.run(("vae",))
    for build in (clean, interrupted):
        assert build.done("vae")
    name = "vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "clean" / name).read_bytes() == (
        tmp_path / "interrupted" / name
    ).read_bytes()


@pytest.mark.parametrize(
    "name, keep, message",
    [
        (
            "model.safetensors",
            0.5,
            r"judge/model\.safetensors: incomplete or corrupt safetensors "
            r"file .*; rebuild the world",
        ),
        ("config.json", 0.5, r"judge/config\.json:\d+: not valid JSON .*incomplete or corrupt"),
    ],
)
def test_a_damaged_judge_names_the_file(tmp_path, base_dir, name, keep, message):
    import shutil

    from pipeline.core.errors import DeprojectorError
    from pipeline.world.judge import Judge

    folder = tmp_path / "judge"
    shutil.copytree(base_dir / "judge", folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DeprojectorError, match=message):
        Judge.from_pretrained(folder)


def test_a_cut_world_checkpoint_or_marker_means_redoing_the_part(tmp_path, capsys):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = tmp_path / "part.pt"
    checkpoint.write_bytes(b"PK\x03\x04cut short")
    losses = loop.train_steps(
        "part",
        {"m": model},
        optimizer,
        3,
        1e-3,
        lambda step: model(torch.ones(1, 2)).square().sum(),
        checkpoint,
    )
    assert len(losses) == 3
    assert f"part: {checkpoint} is incomplete or corrupt; starting over" in capsys.readouterr().out
    build = WorldBuild(MICRO, tmp_path / "work")
    (tmp_path / "work" / "vae").mkdir(parents=True)
    build.mark_done("vae", {"steps": 1})
    assert build.done("vae")
    marker = tmp_path / "work" / "vae" / "done.json"
    marker.write_text(marker.read_text()[:10])
    assert not build.done("vae")


@pytest.mark.slow
def test_a_rebuild_retrains_only_the_changed_part_and_what_needs_it(
    tmp_path, base_dir, monkeypatch
):
    """A changed UNet recipe retrains the UNet alone: the CLIP (and with it every caption
    shard and deprojector), the VAE and the judge are taken from the assembled world
    byte for byte. A changed VAE retrains the VAE, and the UNet and judge that need it."""
    import json
    import shutil

    from pipeline.world import build as world_build

    out = tmp_path / "world"
    shutil.copytree(base_dir, out)
    trained = []
    real_run = WorldBuild.run

    def recording_run(self, parts=world_build.PARTS):
        trained.extend(x for x in parts if not self.done(x))
        return real_run(self, parts)

    monkeypatch.setattr(WorldBuild, "run", recording_run)
    recipe = dataclasses.replace(MICRO, unet_min_snr_gamma=5.0)
    summary = world_build.build_world(out, recipe, tmp_path / "work")
    assert trained == ["unet"]
    for name in (
        "clip/model.safetensors",
        "judge/model.safetensors",
        "sd/vae/diffusion_pytorch_model.safetensors",
    ):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes(), name
    assert (out / "sd/unet/diffusion_pytorch_model.safetensors").read_bytes() != (
        base_dir / "sd/unet/diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert summary["params"]["unet_min_snr_gamma"] == 5.0
    assert json.loads((out / "world.json").read_text())["unet"]["fingerprint"]

    trained.clear()
    world_build.build_world(out, dataclasses.replace(recipe, vae_steps=5), tmp_path / "work")
    assert sorted(trained) == ["judge", "unet", "vae"]
    trained.clear()
    world_build.build_world(out, recipe, tmp_path / "work", retrain=("clip",))
    assert trained[0] == "clip" and "unet" in trained  # the UNet needs the CLIP
    assert not (tmp_path / "work").exists()


def test_min_snr_weights_follow_the_formula():
    """min(SNR, gamma) / SNR with SNR = alpha_bar / (1 - alpha_bar) (Hang et al. 2023)."""
    from diffusers import DDPMScheduler

    from pipeline.world.diffusion import SD_SCHEDULE, min_snr_weights

    alpha_bar = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = alpha_bar[t] / (1 - alpha_bar[t])
    weights = min_snr_weights(alpha_bar, t, 5.0)
    assert torch.equal(min_snr_weights(alpha_bar, t, 0.0), torch.ones(4))
    assert snr[0] > 5 > snr[-1]  # both branches are exercised
    assert torch.allclose(weights, torch.where(snr > 5, 5 / snr, torch.ones(4)))


def test_denoising_loss_is_the_mse_of_the_predicted_noise_on_fixed_draws(base_dir):
    """A UNet that predicts zero noise scores the mean square of the seed's noise, whatever
    the scenes; the trained one scores its training and held-out scenes on the same draws,
    and world.json records both."""
    import json

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.world.diffusion import denoising_loss

    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "clip")
    text_encoder = CLIPTextModel.from_pretrained(base_dir / "clip")
    unet = UNet2DConditionModel.from_pretrained(base_dir / "sd" / "unet")
    latents = torch.randn(12, 4, 8, 8)
    _, scenes = world.draw_scenes(12, 3)
    trained = denoising_loss(unet, text_encoder, tokenizer, latents, scenes, seed=7, batch=5)
    assert trained == denoising_loss(unet, text_encoder, tokenizer, latents, scenes, seed=7)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(8))
    zero = denoising_loss(unet, text_encoder, tokenizer, latents, scenes, seed=7)
    assert zero == pytest.approx(noise.pow(2).mean().item(), abs=1e-6)
    assert zero == denoising_loss(unet, text_encoder, tokenizer, 2 * latents, scenes, seed=7)
    record = json.loads((base_dir / "world.json").read_text())["unet"]["denoising_loss"]
    assert set(record) == {"training_scenes", "held_out_scenes"}
    assert all(value > 0 for value in record.values())


def test_the_judge_trains_on_round_trips_and_world_json_records_both_reads(base_dir):
    import json

    from pipeline.world.judge import JudgeNet, train_judge

    record = json.loads((base_dir / "world.json").read_text())
    assert record["params"]["judge_round_trips"] == MICRO.judge_round_trips > 0
    for reads in ("accuracy", "accuracy_round_trip"):
        assert 0 <= record["judge"][reads]["exact"] <= 1
        assert record["judge"][reads]["scenes"] == MICRO.held_out
    images, scenes = world.draw_scenes(8, 0)
    with pytest.raises(ValueError, match="one round trip per image"):
        train_judge(JudgeNet(), images, scenes, 1, 4, 1e-3, 0, base_dir / "x.pt", None, 0.5)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("device", "tpu", "cpu, cuda, cuda:N or mps"),
        ("judge_round_trips", 1.5, "at most 1"),
        ("unet_ema_decay", 1.0, "below 1"),
        ("unet_width", 40, "a multiple of 16"),
        ("unet_min_snr_gamma", -1.0, "at least 0"),
        ("unet_batch", 400, "at most world.unet_scenes = 320"),
    ],
)
def test_world_params_out_of_range_name_the_key(key, value, expected):
    from pipeline.core.sections import ParamsError

    with pytest.raises(ParamsError, match=f"world.{key}` must be {expected}"):
        dataclasses.replace(MICRO, **{key: value}).validate()


def test_a_parts_code_shape_ignores_what_cannot_change_its_weights() -> None:
    """Comments, formatting, imports and the declared file I/O do not retrain the world; a
    changed number, name or statement does."""
    from pipeline.world.build import _code_shape

    code = (
        "import os\n\ndef f(x):\n    return x * 2  # double\n\n"
        "class A:\n    def save(self):\n        open('a').write('1')\n"
    )
    same = (
        "from pipeline.core import atomic\ndef f( x ):\n    return x*2\n"
        "class A:\n    def save(self):\n        atomic.write_text('a', '1')\n"
    )
    assert _code_shape(code, ("A.save",)) == _code_shape(same, ("A.save",))
    assert _code_shape(code) != _code_shape(same)
    assert _code_shape(code) != _code_shape(code.replace("x * 2", "x * 3"))
