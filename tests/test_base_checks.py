"""`deprojector base` refuses every wrong base-model folder with one clear line, and its
fingerprint follows the weights (issue 13); missing builtin models and offline hub ids get
advice that works (issue 11)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from typer.testing import CliRunner

from pipeline.cli import app

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WIDTH = 32


# --- tiny models of each kind ---------------------------------------------------------------


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer without merges: every character is a token."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=WIDTH,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**{**values, **overrides})


def save_clip(
    folder: Path,
    seed: int = 0,
    tokenizer_files: bool = True,
    model_class=CLIPTextModelWithProjection,
    **config,
) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model_class(text_config(tokenizer, **config)).save_pretrained(folder)
    if tokenizer_files:
        tokenizer.save_pretrained(folder)
    return folder


def save_clip_model(folder: Path) -> Path:
    """A full CLIPModel (text and vision towers) folder, saved without tokenizer files."""
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=WIDTH,
    )
    config = CLIPConfig(
        text_config=text_config(tiny_tokenizer()).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=WIDTH,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def save_sd(folder: Path, clip_dir: Path, cross_attention_dim: int = WIDTH) -> Path:
    """A tiny SD 1.x pipeline folder whose UNet cross-attends to `cross_attention_dim`."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(clip_dir),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir),
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    clip = save_clip(root / "clip")
    return {
        "clip": clip,
        "sd": save_sd(root / "sd", clip),
        "sd48": save_sd(root / "sd48", clip, cross_attention_dim=48),
    }


# --- running `deprojector base` -------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str, **base: str):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base": {k: str(v) for k, v in base.items()}}))
    return CliRunner().invoke(app, [*args, "--params", str(params)])


def run_base(tmp_path: Path, clip: Path | str, sd: Path | str):
    out = tmp_path / "models" / "base.json"
    return run_cli(tmp_path, "base", "--out", str(out), clip=clip, sd=sd), out


def assert_known_error(result, *fragments: str, lines: int = 1) -> str:
    """Exit code 2, an `error:` message (one line unless told) with every fragment, and
    nothing else: no traceback, no progress bars."""
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in output
    assert output.startswith("error: ") and output.count("\n") == lines, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in {output!r}"
    return output


def test_good_models_pass_and_record_a_fingerprint(tmp_path, models):
    result, out = run_base(tmp_path, models["clip"], models["sd"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert (record["clip"], record["sd"]) == (str(models["clip"]), str(models["sd"]))
    assert record["hidden_size"] == WIDTH and len(record["fingerprint"]) == 64
    files = record["files"]
    for name in (
        "clip/config.json",
        "clip/model.safetensors",
        "clip/tokenizer.json",
        "sd/model_index.json",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "sd/text_encoder/model.safetensors",
        "sd/tokenizer/tokenizer.json",
    ):
        assert files[name].startswith("sha256:"), name
    # Deterministic: a second run writes the same bytes (downstream stages stay up to date).
    before = out.read_bytes()
    assert run_base(tmp_path, models["clip"], models["sd"])[0].exit_code == 0
    assert out.read_bytes() == before


def test_clip_model_folder_without_tokenizer_files(tmp_path, models):
    folder = save_clip_model(tmp_path / "clip-model")
    result, out = run_base(tmp_path, folder, models["sd"])
    assert_known_error(
        result,
        f"base.clip: the folder '{folder}'",
        "has no tokenizer files",
        "tokenizer.json, or vocab.json and merges.txt",
        "2-token tokenizer",
        "hf download openai/clip-vit-large-patch14 --local-dir DIR",
    )
    assert not out.exists()
    # The same folder with the tokenizer files is a valid base.clip (text tower + projection).
    tiny_tokenizer().save_pretrained(folder)
    assert run_base(tmp_path, folder, models["sd"])[0].exit_code == 0


def test_text_encoder_without_projection(tmp_path, models):
    # SD's own text_encoder folder: a CLIPTextModel, no text_projection (and no tokenizer).
    sd_text_encoder = models["sd"] / "text_encoder"
    # A text encoder with tokenizer files beside it.
    with_tokenizer = save_clip(tmp_path / "text-encoder", model_class=CLIPTextModel)
    for folder in (sd_text_encoder, with_tokenizer):
        result, _ = run_base(tmp_path, folder, models["sd"])
        assert_known_error(
            result,
            f"base.clip: '{folder}' has no text_projection weights",
            "(in model.safetensors)",
            "initialise the projection at random",
            "Stable Diffusion's text_encoder folder",
            "openai/clip-vit-large-patch14 for SD 1.x",
        )


def test_unet_of_another_width(tmp_path, models):
    result, _ = run_base(tmp_path, models["clip"], models["sd48"])
    assert_known_error(
        result,
        f"base.sd '{models['sd48']}' does not fit base.clip",
        "cross-attends to 48-wide conditioning",
        f"hidden states are {WIDTH} wide",
    )


def test_unet_of_another_width_is_refused_when_generating():
    from pipeline.base.checks import check_cross_attention
    from pipeline.base.files import BaseModelError

    with pytest.raises(BaseModelError, match="cross-attends to 768-wide .* are 128 wide"):
        check_cross_attention(768, 128)
    check_cross_attention(768, 768)


def test_eos_token_id_that_misses_the_tokenizer(tmp_path, models):
    tokenizer = tiny_tokenizer()
    folder = save_clip(tmp_path / "bad-eos", eos_token_id=5)  # a byte, not <|endoftext|>
    result, _ = run_base(tmp_path, folder, models["sd"])
    assert_known_error(
        result,
        "does not pool at the end-of-text token",
        "two different prompts pool to the same vector",
        "eos_token_id = 5",
        f"<|endoftext|> is id {tokenizer.eos_token_id}",
        f'Set "eos_token_id": {tokenizer.eos_token_id}',
    )


def test_weights_replaced_at_the_same_path_change_the_fingerprint(tmp_path, models):
    clip = shutil.copytree(models["clip"], tmp_path / "clip")
    _, out = run_base(tmp_path, clip, models["sd"])
    before = json.loads(out.read_text())
    save_clip(clip, seed=1)  # same folder, same names, other weights
    result, _ = run_base(tmp_path, clip, models["sd"])
    assert result.exit_code == 0, result.output
    after = json.loads(out.read_text())
    assert after["fingerprint"] != before["fingerprint"]
    changed = {k for k in after["files"] if after["files"][k] != before["files"][k]}
    assert changed == {"clip/model.safetensors"}


def test_a_retrained_unet_changes_the_base_record_but_not_the_clips(tmp_path, models):
    """models/base-clip.json (what captions, gap, extract and train depend on) follows the
    CLIP's files alone; models/base.json follows the UNet too."""
    sd = shutil.copytree(models["sd"], tmp_path / "sd")
    _, out = run_base(tmp_path, models["clip"], sd)
    clip_out = out.with_name("base-clip.json")
    before, clip_before = json.loads(out.read_text()), json.loads(clip_out.read_text())
    assert set(clip_before["files"]) == {k for k in before["files"] if k.startswith("clip/")}
    unet = sd / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet)
    save_file({k: v + 1e-3 for k, v in tensors.items()}, unet)  # "retrained"
    result, _ = run_base(tmp_path, models["clip"], sd)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["fingerprint"] != before["fingerprint"]
    assert json.loads(clip_out.read_text()) == clip_before


def test_large_files_are_fingerprinted_by_size_and_edges(tmp_path, monkeypatch):
    from pipeline.base import files as base_files

    monkeypatch.setattr(base_files, "FULL_HASH_LIMIT", 4 * base_files.EDGE)
    path = tmp_path / "big.safetensors"
    data = bytearray(8 * base_files.EDGE)
    path.write_bytes(bytes(data))
    first = base_files.file_digest(path)
    assert first.startswith("size+edges:")
    data[-1] = 1  # a change in the last MiB is seen
    path.write_bytes(bytes(data))
    assert base_files.file_digest(path) != first


def test_missing_builtin_models_name_the_world_stage(tmp_path, monkeypatch):
    from pipeline.world import config

    monkeypatch.chdir(tmp_path)  # no models/world here, and none in the checkout either
    monkeypatch.setattr(config, "CHECKOUT_WORLD_DIR", tmp_path / "no-checkout-world")
    for args in (("base",), ("captions",)):
        result = run_cli(tmp_path, *args, clip="builtin", sd="builtin")
        output = assert_known_error(
            result,
            "base.clip: builtin:",
            "does not exist yet",
            "built by the world stage",
            "`deprojector world`",
            "`dvc repro world`",
        )
        assert "hub" not in output.lower()


def test_offline_hub_id_advises_hf_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli(tmp_path, "base", clip="no-such-org/no-such-clip", sd="no-such-org/no-sd")
    assert_known_error(
        result,
        "'no-such-org/no-such-clip' is not a local folder",
        "`hf download no-such-org/no-such-clip --local-dir DIR`",
        lines=2,
    )


def test_the_advised_download_command_exists():
    hf = shutil.which("hf") or shutil.which("hf", path=str(Path(sys.executable).parent))
    if hf is None:
        pytest.skip("the `hf` executable (huggingface_hub) is not installed")
    for args in (["--help"], ["download", "--help"]):
        done = subprocess.run([hf, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert "--local-dir" in done.stdout


def test_evaluate_refuses_deprojectors_of_another_width(tmp_path, models, monkeypatch):
    """evaluate gives the same one-line error as encode, generate and render."""
    from pipeline.base.loaders import load_clip
    from pipeline.config.params import parse_params
    from pipeline.data.extraction import compute_constants, extract_split
    from pipeline.data.shards import save_constants
    from pipeline.models import build_deprojector

    monkeypatch.chdir(tmp_path)
    clip = load_clip(str(models["clip"]))
    constants = compute_constants(clip)
    shards = tmp_path / "data" / "shards"
    params = parse_params(
        {
            "base": {"clip": str(models["clip"]), "sd": str(models["sd"])},
            "models": {"vb": {"type": "vicinity-batch"}},
        }
    )
    extract_split(
        clip, ["a red circle", "a blue square"], shards / "test", params, 0, constants["null"]
    )
    save_constants(shards / "constants.safetensors", **constants)
    other = {"sos": torch.zeros(16), "null": torch.zeros(16), "deprojection": torch.eye(16)}
    build_deprojector("vicinity-batch", 16, 16, other).save_pretrained(tmp_path / "models" / "vb")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "base": {"clip": str(models["clip"]), "sd": str(models["sd"])},
                "models": {"vb": {"type": "vicinity-batch"}},
            }
        )
    )
    result = CliRunner().invoke(app, ["evaluate", "--params", str(tmp_path / "params.yaml")])
    assert_known_error(
        result, "trained for D=16", f"base model has D={WIDTH}", "retrain it or use its base CLIP"
    )


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the Hugging Face cache holds a download of `repo`: blobs named by their
    sha256, a snapshot of symlinks to them, refs/main naming the snapshot."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for path in folder.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, root / "blobs" / blob)
        (root / "snapshots" / commit / path.name).symlink_to(f"../../blobs/{blob}")


def test_hub_ids_are_checked_and_fingerprinted_from_the_local_cache(tmp_path, models, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "tiny-org/tiny-clip", models["clip"])
    fake_hub_cache(cache, "tiny-org/text-encoder-only", models["sd"] / "text_encoder")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result, out = run_base(tmp_path, "tiny-org/tiny-clip", models["sd"])
    assert result.exit_code == 0, result.output
    files = json.loads(out.read_text())["files"]
    assert files["clip/model.safetensors"].startswith("etag:")  # the blob name, not re-hashed
    result, _ = run_base(tmp_path, "tiny-org/text-encoder-only", models["sd"])
    assert_known_error(result, "'tiny-org/text-encoder-only' has no text_projection weights")
    shutil.rmtree(cache / "models--tiny-org--tiny-clip")  # gone from the cache, and offline
    result, _ = run_base(tmp_path, "tiny-org/tiny-clip", models["sd"])
    assert_known_error(
        result, "Hub is not reachable (offline)", "hf download tiny-org/tiny-clip", lines=2
    )


def test_dvc_reruns_the_users_of_the_base_models_when_the_fingerprint_changes():
    """dvc.yaml: `base` always runs and writes models/base.json and models/base-clip.json;
    the stages that load the base models depend on one of them, not on the folder names in
    params.yaml: those that use the CLIP alone on the CLIP's record, so a retrained UNet, VAE
    or judge does not rerun them; train on both (its cross_attention, mix and unet losses
    read base.sd's UNet)."""
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    base = stages["base"]
    assert base["always_changed"] is True
    # persist: an experiment whose params fail base's checks leaves them (issue 32)
    assert base["outs"] == [
        {"models/base.json": {"cache": False, "persist": True}},
        {"models/base-clip.json": {"cache": False, "persist": True}},
    ]
    for name in ("captions", "extract", "gap", "train"):
        deps = stages[name].get("do", stages[name])["deps"]
        record = "models/base.json" if name == "train" else "models/base-clip.json"
        other = "models/base-clip.json" if name == "train" else "models/base.json"
        assert record in deps and other not in deps, name
        assert not any(
            d in deps
            for d in (
                "pipeline/world",
                "pipeline/world/judge.py",
                "pipeline/world/diffusion.py",
                "pipeline/world/vae.py",
            )
        ), name
    for name, stage in stages.items():
        assert "models/base" not in stage.get("deps", stage.get("do", {}).get("deps", [])), name


def test_text_projection_is_found_in_bin_and_sharded_checkpoints(tmp_path, models):
    """pytorch_model.bin and model.safetensors.index.json checkpoints are read too."""
    from safetensors.torch import load_file, save_file

    from pipeline.base.files import BaseModelError, check_text_projection, weight_files

    tensors = load_file(models["clip"] / "model.safetensors")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(tensors, binary / "pytorch_model.bin")
    check_text_projection(binary, "bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, keys in halves.items() for k in keys}})
    )
    assert [p.name for p in weight_files(sharded)] == sorted(halves)
    check_text_projection(sharded, "sharded")
    torch.save(
        {k: v for k, v in tensors.items() if "text_projection" not in k},
        binary / "pytorch_model.bin",
    )
    with pytest.raises(BaseModelError, match=r"no text_projection weights \(in pytorch_model"):
        check_text_projection(binary, "bin")


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (
            lambda clip: cut(clip / "model.safetensors"),
            [
                "clip/model.safetensors: incomplete or corrupt safetensors file",
                "download the model again",
            ],
        ),
        (
            lambda clip: (clip / "model.safetensors").write_bytes(b"\x00" * 4),
            [
                "clip/model.safetensors: incomplete or corrupt safetensors file (Error while "
                "deserializing header: header too small)"
            ],
        ),
        (lambda clip: cut(clip / "config.json"), ["clip/config.json:", "not valid JSON"]),
        (
            lambda clip: cut(clip / "tokenizer.json"),
            ["clip/tokenizer.json", "incomplete or corrupt"],
        ),
    ],
)
def test_damaged_clip_files_name_the_file(tmp_path, models, damage, fragments):
    clip = tmp_path / "clip"
    shutil.copytree(models["clip"], clip)
    damage(clip)
    result, out = run_base(tmp_path, clip, models["sd"])
    assert_known_error(result, *fragments)
    assert not out.exists()


def test_damaged_sharded_and_bin_checkpoints_name_the_file(tmp_path, models):
    from safetensors.torch import load_file, save_file

    from pipeline.base.files import check_text_projection
    from pipeline.base.loaders import BaseModelError

    tensors = load_file(models["clip"] / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file(tensors, str(sharded / "model-00001-of-00002.safetensors"))
    index = sharded / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"')
    with pytest.raises(
        BaseModelError,
        match=r"model\.safetensors\.index\.json:1: not valid JSON "
        r"\(.*\); the file is incomplete or corrupt",
    ):
        check_text_projection(sharded, "sharded")
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with pytest.raises(
        BaseModelError,
        match=r"index\.json: names model-00002-of-00002\."
        r"safetensors, not in the folder",
    ):
        check_text_projection(sharded, "sharded")
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(BaseModelError, match=r'index\.json: expected a "weight_map" object'):
        check_text_projection(sharded, "sharded")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(tensors, binary / "pytorch_model.bin")
    cut(binary / "pytorch_model.bin")
    with pytest.raises(
        BaseModelError,
        match=r"pytorch_model\.bin: incomplete or corrupt "
        r"PyTorch checkpoint",
    ):
        check_text_projection(binary, "bin")


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda sd: cut(sd / "model_index.json"), ["model_index.json"]),
        (
            lambda sd: cut(sd / "unet" / "diffusion_pytorch_model.safetensors"),
            ["unet/diffusion_pytorch_model.safetensors"],
        ),
    ],
)
def test_damaged_sd_files_name_the_file(tmp_path, models, damage, fragments):
    sd = tmp_path / "sd"
    shutil.copytree(models["sd"], sd)
    damage(sd)
    result, out = run_base(tmp_path, models["clip"], sd)
    assert_known_error(result, *fragments)
    assert not out.exists()
