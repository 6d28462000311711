"""Deprojectors as diffusers models on the Hub: save_pretrained / from_pretrained (folders, Hub
ids from the cache, folders of earlier versions), push_to_hub's upload plan, the model card,
and the sampling settings a folder records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from safetensors.torch import save_file

from pipeline.core.conventions import CONSTANT_NAMES
from pipeline.core.names import CARD_FILE, GAP_FILE
from pipeline.models import (
    ARCHITECTURES,
    Deprojector,
    build_deprojector,
    load_deprojector,
    recorded_sampling,
)
from pipeline.models.card import CardError, CardFacts, Figure, read_card_facts, write_card
from pipeline.models.ensemble import EnsembleDeprojector

D, P = 32, 48
REPO = Path(__file__).resolve().parent.parent
SAMPLING = {"steps": 3, "guidance_scale": 2.5, "height": 32, "width": 32, "scheduler": "pndm"}


def tiny_model(model_type: str = "vicinity-batch", seed: int = 0) -> Deprojector:
    torch.manual_seed(seed)
    constants = {
        "sos": torch.randn(D),
        "null": torch.randn(D),
        "deprojection": torch.randn(D, P),
    }
    assert sorted(constants) == sorted(CONSTANT_NAMES)
    model = build_deprojector(
        model_type, D, P, constants, **ARCHITECTURES[model_type].tiny_config()
    )
    return model.eval()


def same_states(a: Deprojector, b: Deprojector) -> bool:
    e = torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    return torch.equal(a.generate(e), b.generate(e))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_is_a_diffusers_model_and_round_trips(tmp_path, model_type):
    model = tiny_model(model_type)
    assert isinstance(model, ModelMixin) and isinstance(model, ConfigMixin)
    model.config.sampling = dict(SAMPLING)  # recorded after construction, as training does
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["_class_name"] == type(model).__name__ and "_diffusers_version" in raw
    assert raw["model_type"] == model_type and raw["sampling"] == SAMPLING
    # diffusers' own config reader sees the constructor's settings
    assert Deprojector.load_config(tmp_path)["hidden_size"] == D
    loaded = Deprojector.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert same_states(model, loaded)
    fresh = Deprojector.from_config(Deprojector.load_config(tmp_path))  # diffusers' pair
    assert type(fresh) is type(model) and fresh.config == model.config


def test_a_folder_of_the_earlier_layout_keeps_loading(tmp_path):
    """Today's committed folders: config.json without diffusers' keys or `sampling`."""
    model = tiny_model("transformer")
    old = {k: v for k, v in model.config.to_dict().items() if k != "sampling"}
    (tmp_path / "config.json").write_text(json.dumps(old, indent=2))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_deprojector(tmp_path)
    assert loaded.config.sampling == {} and same_states(model, loaded)
    assert recorded_sampling(tmp_path) == {}


@pytest.mark.parametrize("name", ["vt-rollout", "ensemble"])
def test_the_committed_runs_load_and_resave(tmp_path, name):
    folder = REPO / "models" / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"models/{name} is not in this checkout")
    model = load_deprojector(folder)
    model.save_pretrained(tmp_path / name)  # an ensemble: self-contained, members inside
    assert (tmp_path / name / GAP_FILE).is_file()
    again = load_deprojector(tmp_path / name)
    e = torch.randn(2, model.config.hidden_size)
    assert torch.equal(model.generate(e), again.generate(e))


def hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` laid out in a Hugging Face cache as snapshot_download leaves a repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    return snapshot


def test_a_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch):
    model = tiny_model("lstm")
    model.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "cache"
    hub_cache(cache, "someone/tiny-deprojector", tmp_path / "saved")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = Deprojector.from_pretrained("someone/tiny-deprojector", cache_dir=cache)
    assert same_states(model, loaded)
    assert "snapshots" in str(loaded.name_or_path)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        Deprojector.from_pretrained("someone/missing", cache_dir=cache)


def test_an_ensemble_loads_from_the_hub_cache_with_its_members(tmp_path, monkeypatch):
    members = [tiny_model("vicinity-batch", 0), tiny_model("lstm", 0)]
    for k, member in enumerate(members):
        member.save_pretrained(tmp_path / f"m{k}")
    members = [load_deprojector(tmp_path / f"m{k}") for k in range(2)]
    EnsembleDeprojector.of(members).save_pretrained(tmp_path / "ensemble")
    cache = tmp_path / "cache"
    hub_cache(cache, "someone/ensemble", tmp_path / "ensemble")
    loaded = Deprojector.from_pretrained("someone/ensemble", cache_dir=cache, local_files_only=True)
    assert isinstance(loaded, EnsembleDeprojector)
    assert same_states(EnsembleDeprojector.of(members), loaded)


def upload_plan(model: Deprojector, repo_id: str) -> tuple[list[str], dict]:
    """The files push_to_hub would send (paths in the repository) and the commit's keywords,
    with huggingface_hub's network calls replaced."""
    sent: dict = {}

    def create_commit(self, repo_id, operations, **kwargs):
        sent["paths"] = sorted(op.path_in_repo for op in operations)
        sent["kwargs"] = {"repo_id": repo_id, **kwargs}
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid="abc",
        )

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    with (
        mock.patch.object(HfApi, "create_commit", create_commit),
        mock.patch.object(HfApi, "create_repo", create_repo),
    ):
        url = model.push_to_hub(repo_id, token="hf_test")
    assert url.endswith("/commit/abc")
    return sent["paths"], sent["kwargs"]


def test_push_to_hub_sends_the_folder_with_its_card_and_gap_statistics(tmp_path):
    model = tiny_model("transformer")
    model.save_pretrained(tmp_path)
    (tmp_path / GAP_FILE).write_bytes(b"gap")
    facts = CardFacts("tiny", "transformer", "builtin", "builtin", 10, 1, 1, 0.5, "builtin")
    write_card(facts, tmp_path, "someone/tiny")
    paths, kwargs = upload_plan(load_deprojector(tmp_path), "someone/tiny")
    assert paths == [CARD_FILE, "config.json", GAP_FILE, "model.safetensors"]
    assert kwargs["repo_id"] == "someone/tiny"


def test_push_to_hub_of_an_ensemble_sends_its_members(tmp_path):
    members = []
    for kind in ("vicinity-batch", "lstm"):
        tiny_model(kind).save_pretrained(tmp_path / kind)
        members.append(load_deprojector(tmp_path / kind))
    paths, _ = upload_plan(EnsembleDeprojector.of(members), "someone/ensemble")
    assert paths == [
        "config.json",
        "members/00-vicinity-batch/config.json",
        "members/00-vicinity-batch/model.safetensors",
        "members/01-lstm/config.json",
        "members/01-lstm/model.safetensors",
    ]


def test_a_card_round_trips_its_facts_and_figures(tmp_path):
    figures = (
        Figure("autoregressive cosine", 0.7, 0.68, 0.72, "reports/metrics/x.json"),
        Figure("single adherence", 0.5, None, None, "reports/metrics/adherence.json"),
    )
    facts = CardFacts(
        "x", "lstm", "openai/clip-vit-large-patch14", "runwayml/stable-diffusion-v1-5",
        3000, 8, 1504, 61.2, "builtin", dict(SAMPLING), figures,
    )  # fmt: skip
    card = write_card(facts, tmp_path, "models/x")
    assert read_card_facts(tmp_path) == facts
    data = ModelCard.load(tmp_path / CARD_FILE).data
    assert data.library_name == "clip-text-deprojector"
    assert data.base_model == [
        "openai/clip-vit-large-patch14",
        "runwayml/stable-diffusion-v1-5",
    ]
    assert "lstm" in data.tags and data.license
    assert data.evaluation["autoregressive cosine"]["ci95"] == [0.68, 0.72]
    assert "| autoregressive cosine | 0.7 | [0.68, 0.72] |" in card.text
    assert "| single adherence | 0.5 | n/a |" in card.text
    assert "3,000 training rows" in card.text and "8 epochs" in card.text


def test_from_config_refuses_what_it_cannot_build():
    from pipeline.models import ModelFileError

    with pytest.raises(ModelFileError, match="an ensemble is built from saved members"):
        Deprojector.from_config({"model_type": "ensemble", "hidden_size": D})
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        Deprojector.from_config(tiny_model("transformer").config.to_dict(), heads=3)


def test_a_folder_without_a_card_is_named(tmp_path):
    with pytest.raises(CardError, match="has no model card"):
        read_card_facts(tmp_path)


# --- trained folders: the card the pipeline writes, the settings they record -------------------


@pytest.fixture
def project(tmp_path, base_dir, small_shards, monkeypatch):
    """A project folder holding the small shards (micro-world base models), as cwd."""
    from tests.conftest import project_dir

    work = project_dir(tmp_path / "project", base_dir)
    shutil.copytree(small_shards.parent, work / "data")
    monkeypatch.chdir(work)
    return work


def test_train_writes_the_card_and_the_card_stage_adds_evaluates_figures(project):
    """`deprojector train` on scratch params writes the card (metadata, budget) and the
    sampling settings; `deprojector card` copies the figures with their intervals; the card's
    diffusers snippet runs as written and draws with the recorded settings."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.conftest import SMALL

    render = {k: v for k, v in SAMPLING.items()}
    raw = {
        **SMALL,
        "train": {"epochs": 1, "batch_size": 16, "patience": 0, "seed": 0},
        "render": render,
        "models": {"tiny": {"type": "vicinity-batch", "norm": "layer", "vicinity": 2}},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", "tiny"])
    assert result.exit_code == 0, result.output
    folder = project / "models" / "tiny"
    assert recorded_sampling(folder) == SAMPLING
    facts = read_card_facts(folder)
    assert (facts.model_type, facts.epochs, facts.figures) == ("vicinity-batch", 1, ())
    assert facts.rows > 0 and facts.steps == -(-facts.rows // 16)
    assert "Not evaluated yet" in (folder / CARD_FILE).read_text()

    result = CliRunner().invoke(app, ["card", "tiny"])
    assert result.exit_code == 2 and "run `deprojector evaluate` first" in result.output
    metrics = project / "reports" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "tiny.json").write_text(
        json.dumps({"autoregressive": {"cosine": 0.61, "cosine_ci95": [0.6, 0.62]}})
    )
    (metrics / "adherence.json").write_text(
        json.dumps({"single": {"tiny": {"adherence": 0.4, "adherence_ci95": [0.3, 0.5]}}})
    )
    result = CliRunner().invoke(app, ["card", "tiny"])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(folder / CARD_FILE)
    assert card.data.evaluation["autoregressive cosine"] == {
        "value": 0.61,
        "ci95": [0.6, 0.62],
        "source": "reports/metrics/tiny.json",
    }
    assert "| single adherence | 0.4 | [0.3, 0.5] |" in card.text
    assert read_card_facts(folder).rows == facts.rows  # the budget kept

    snippet = card.text.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert (project / "deprojected.png").is_file()
    assert scope["encoder"].sampling_kwargs() == {
        "num_inference_steps": 3,
        "guidance_scale": 2.5,
        "height": 32,
        "width": 32,
    }


def test_generate_outside_a_project_draws_with_the_folders_settings(tmp_path, monkeypatch):
    """Precedence: flags > params.yaml in the cwd > the folder's recorded settings > render's
    defaults. From a directory without params.yaml, `generate` draws the in-project picture."""
    from typer.testing import CliRunner

    from pipeline.base.loaders import load_clip
    from pipeline.cli import app
    from pipeline.data.extraction import compute_constants
    from pipeline.training.loop import record_base
    from pipeline.world.config import CHECKOUT_WORLD_DIR

    if not (CHECKOUT_WORLD_DIR / "sd").is_dir():
        pytest.skip("the committed world is not in this checkout")
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "world").symlink_to(CHECKOUT_WORLD_DIR, target_is_directory=True)
    clip = load_clip("builtin", base_dir=CHECKOUT_WORLD_DIR)
    torch.manual_seed(0)
    model = build_deprojector(
        "vicinity-batch", clip.hidden_size, clip.projection_size, compute_constants(clip)
    ).eval()
    monkeypatch.chdir(project)
    record_base(model, "builtin")
    model.config.sampling = dict(SAMPLING)
    model.save_pretrained(project / "models" / "run")
    (project / "params.yaml").write_text(
        "render:\n  steps: 3\n  guidance_scale: 2.5\n  height: 32\n  width: 32\n"
    )
    args = ["generate", "red circle", "-m", str(project / "models" / "run"), "-o"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, str(tmp_path / "in.png")]).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, [*args, str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "in.png").read_bytes()
    result = runner.invoke(app, [*args, str(tmp_path / "flag.png"), "--guidance", "7.5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flag.png").read_bytes() != (tmp_path / "in.png").read_bytes()
