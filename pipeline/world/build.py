"""Train the embedded world, part by part, into models/world/{clip,sd,judge} + world.json.

Parts: `clip` (BPE tokenizer + CLIPModel), `vae`, `unet` (needs clip and vae), `judge` (needs
the vae: it trains on round trips). Each trains into the work folder and marks itself done
with a fingerprint of its settings, its code and the parts it needs; an interrupted build
resumes from the last checkpoint of the running part and keeps the done ones. A part whose
fingerprint matches the one recorded in the assembled world's world.json is taken from there
instead of retrained (unless asked to retrain it), so changing the UNet's recipe retrains the
UNet only and the CLIP, with every caption shard and deprojector made with it, stays valid.
The work folder is removed once the world is assembled.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.core.atomic import atomic_path, write_text
from pipeline.world import clip as world_clip
from pipeline.world import diffusion, judge, vae
from pipeline.world import scenes as world
from pipeline.world.config import WorldParams
from pipeline.world.tokenizer import save_tokenizer, train_tokenizer

PARTS = ("clip", "vae", "unet", "judge")


DEPENDS = {"clip": (), "vae": (), "unet": ("clip", "vae"), "judge": ("vae",)}
# Torch threads per part on the CPU. Fixed, so that floating-point reductions, and with them
# the weights, do not depend on the machine's core count; the small parts gain little more.
THREADS = {"clip": 1, "vae": 1, "unet": 2, "judge": 1}
SETTINGS = {  # the params each part's result depends on (besides seed, scenes and device)
    "clip": ("vocab_size", "clip_steps", "clip_batch", "clip_lr", "width"),
    "vae": ("vae_steps", "vae_batch", "vae_lr", "vae_width", "vae_layers"),
    "unet": (
        "unet_steps",
        "unet_batch",
        "unet_lr",
        "unet_width",
        "unet_warmup",
        "unet_ema_decay",
        "unet_min_snr_gamma",
        "captions_per_scene",
        "unet_scenes",
    ),
    "judge": ("judge_steps", "judge_batch", "judge_lr", "judge_round_trips", "held_out"),
}
# The modules (of pipeline/world) whose code trains each part, besides scenes.py and loop.py.
CODE = {
    "clip": ("clip.py", "tokenizer.py"),
    "vae": ("vae.py",),
    "unet": ("diffusion.py",),
    "judge": ("judge.py",),
}
# Where each part lives in an assembled world.
ASSEMBLED = {"clip": "clip", "vae": "sd/vae", "unet": "sd/unet", "judge": "judge"}


# What in the modules of CODE only reads or writes files ("Class.method" for a method): it
# cannot change a trained part, so a part's fingerprint leaves it out, and making a save
# atomic does not retrain the world. Nothing that computes weights belongs here.
FILE_IO = {"judge.py": ("Judge.save_pretrained",), "tokenizer.py": ("save_tokenizer",)}


def _code_digest(part: str) -> str:
    digest = hashlib.sha256()
    for name in ("scenes.py", "loop.py", *CODE[part]):
        source = (Path(__file__).parent / name).read_text()
        digest.update(_code_shape(source, FILE_IO.get(name, ())).encode())
    return digest.hexdigest()[:16]


def _code_shape(source: str, file_io: tuple[str, ...] = ()) -> str:
    """What a module's code does, without what cannot change a trained part: comments,
    formatting, import statements (a module that moves is the same code; a changed import
    shows where the imported name is used) and the `file_io` definitions. Python's syntax
    tree, written out field by field with empty fields left out, so that a Python version
    that adds a field (empty in this code) reads the same."""

    def shape(node: object) -> str:
        if isinstance(node, ast.AST):
            fields = [
                f"{name}={shape(value)}"
                for name, value in ast.iter_fields(node)
                if name not in ("ctx", "type_comment") and value not in (None, [])
            ]
            return f"{type(node).__name__}({', '.join(fields)})"
        if isinstance(node, list):
            return f"[{', '.join(shape(item) for item in node)}]"
        return repr(node)

    def kept(nodes: list[ast.stmt], prefix: str = "") -> list[ast.stmt]:
        out = []
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                if prefix + node.name in file_io:
                    continue
                if isinstance(node, ast.ClassDef):
                    node.body = kept(node.body, f"{node.name}.")
            out.append(node)
        return out

    tree = ast.parse(source)
    tree.body = kept(tree.body)
    return shape(tree)


def _fingerprint(part: str, p: WorldParams) -> str:
    settings = {k: getattr(p, k) for k in ("seed", "scenes", "device", *SETTINGS[part])}
    deps = [_fingerprint(d, p) for d in DEPENDS[part]]
    blob = json.dumps([part, settings, _code_digest(part), deps], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_vae_part(
    p: WorldParams, images: np.ndarray, checkpoint: Path
) -> tuple[AutoencoderKL, dict]:
    """The VAE of `p` (on the CPU, its latent scaling factor measured) and its record:
    final loss, scaling factor and PSNR of round trips of held-out drawn scenes."""
    model = vae.build_vae(p.vae_width, p.vae_layers, p.seed + 3)
    losses = vae.train_vae(
        model, images, p.vae_steps, p.vae_batch, p.vae_lr, p.seed, checkpoint, device=p.device
    )
    means, stds = vae.encode_latents(model, images)
    model.register_to_config(scaling_factor=vae.measure_scaling_factor(means, stds, p.seed))
    held_out, _ = world.draw_scenes(p.held_out, p.seed + 4)
    model.cpu()
    return model, {
        "final_loss": float(np.mean(losses[-50:])),
        "scaling_factor": model.config.scaling_factor,
        "reconstruction_psnr_db": vae.psnr(held_out, vae.round_trip(model, held_out)),
    }


def train_unet_part(
    p: WorldParams, clip_dir: Path, vae_dir: Path, checkpoint: Path
) -> tuple[UNet2DConditionModel, dict]:
    """The UNet of `p` (the moving average of its weights, on the CPU), trained on the first
    world.unet_scenes scenes through the VAE in vae_dir and the CLIP in clip_dir, and its
    record: final training loss and the denoising loss on training and held-out scenes."""
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel.from_pretrained(clip_dir)
    autoencoder = AutoencoderKL.from_pretrained(vae_dir).to(p.device)
    images, scenes = world.draw_scenes(p.unet_scenes, p.seed)
    means, stds = vae.encode_latents(autoencoder, images)
    unet = diffusion.build_unet(p.unet_width, p.width, p.seed + 5)
    recipe = diffusion.UnetRecipe(
        p.unet_steps, p.unet_batch, p.unet_lr, p.unet_warmup, p.unet_ema_decay, p.unet_min_snr_gamma
    )
    scaling = autoencoder.config.scaling_factor
    ema, losses = diffusion.train_unet(
        unet,
        text_encoder,
        tokenizer,
        means,
        stds,
        scaling,
        scenes,
        p.captions_per_scene,
        recipe,
        p.seed,
        checkpoint,
        p.device,
    )
    held_images, held = world.draw_scenes(p.held_out, p.seed + 1)
    held_means, _ = vae.encode_latents(autoencoder, held_images)
    count = min(p.held_out, len(scenes))

    def loss_on(latent_means: torch.Tensor, of: list[world.Scene]) -> float:
        return diffusion.denoising_loss(
            ema, text_encoder, tokenizer, latent_means * scaling, of, p.seed, p.device
        )

    # The same count, caption draw, noise and timesteps for both: a gap is memorisation.
    return ema.cpu(), {
        "final_loss": float(np.mean(losses[-50:])),
        "denoising_loss": {
            "training_scenes": loss_on(means[:count], scenes[:count]),
            "held_out_scenes": loss_on(held_means[:count], held[:count]),
        },
    }


class WorldBuild:
    def __init__(self, p: WorldParams, work: Path) -> None:
        self.p, self.work = p, work
        self._data: tuple[np.ndarray, list[world.Scene]] | None = None

    @property
    def data(self) -> tuple[np.ndarray, list[world.Scene]]:
        if self._data is None:
            self._data = world.draw_scenes(self.p.scenes, self.p.seed)
        return self._data

    def done(self, part: str) -> bool:
        """The part finished with these settings (an unreadable marker: it did not)."""
        marker = self.work / part / "done.json"
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):  # missing, or cut short by a kill
            return False
        return isinstance(info, dict) and info.get("fingerprint") == _fingerprint(part, self.p)

    def mark_done(self, part: str, info: dict) -> None:
        info = {"fingerprint": _fingerprint(part, self.p), **info}
        with atomic_path(self.work / part / "done.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")

    def info(self, part: str) -> dict:
        return json.loads((self.work / part / "done.json").read_text())

    def checkpoint(self, part: str) -> Path:
        return self.work / f"{part}-{_fingerprint(part, self.p)}.pt"

    def adopt(self, out: Path, parts: tuple[str, ...]) -> list[str]:
        """Take `parts` from the assembled world in `out` where world.json records this
        build's fingerprint for them; returns the parts taken."""
        try:
            recorded = json.loads((out / "world.json").read_text())
        except (OSError, ValueError):
            return []
        taken = []
        for part in parts:
            info = recorded.get(part)
            if (
                self.done(part)
                or not isinstance(info, dict)
                or info.get("fingerprint") != _fingerprint(part, self.p)
                or not (out / ASSEMBLED[part]).is_dir()
            ):
                continue
            if (self.work / part).exists():
                shutil.rmtree(self.work / part)
            shutil.copytree(out / ASSEMBLED[part], self.work / part)
            self.mark_done(part, {k: v for k, v in info.items() if k != "fingerprint"})
            taken.append(part)
        return taken

    # --- parts ------------------------------------------------------------------------------

    def train_clip(self) -> dict:
        p, folder = self.p, self.work / "clip"
        images, scenes = self.data
        corpus = world.generate_captions(20_000, seed=p.seed + 1)
        tokenizer = train_tokenizer(corpus, p.vocab_size)
        model = world_clip.build_clip(tokenizer, world_clip.ClipSizes(width=p.width), p.seed)
        losses = world_clip.train_clip(
            model,
            tokenizer,
            images,
            scenes,
            p.clip_steps,
            p.clip_batch,
            p.clip_lr,
            p.seed,
            self.checkpoint("clip"),
            p.device,
        )
        folder.mkdir(parents=True, exist_ok=True)
        model.cpu().save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
        world_clip.image_processor().save_pretrained(folder)
        single_images, single = world.draw_scenes(p.held_out, p.seed + 2, max_things=1)
        return {
            "final_loss": float(np.mean(losses[-50:])),
            "zero_shot": world_clip.zero_shot_accuracy(model, tokenizer, single_images, single),
        }

    def train_vae(self) -> dict:
        images, _ = self.data
        model, info = train_vae_part(self.p, images, self.checkpoint("vae"))
        model.save_pretrained(self.work / "vae")
        return info

    def train_unet(self) -> dict:
        ema, info = train_unet_part(
            self.p, self.work / "clip", self.work / "vae", self.checkpoint("unet")
        )
        ema.save_pretrained(self.work / "unet")
        return info

    def train_judge(self) -> dict:
        p, folder = self.p, self.work / "judge"
        images, scenes = self.data
        autoencoder = AutoencoderKL.from_pretrained(self.work / "vae").to(p.device)
        round_trips = vae.round_trip(autoencoder, images) if p.judge_round_trips > 0 else None
        torch.manual_seed(p.seed + 6)
        net = judge.JudgeNet()
        losses = judge.train_judge(
            net,
            images,
            scenes,
            p.judge_steps,
            p.judge_batch,
            p.judge_lr,
            p.seed,
            self.checkpoint("judge"),
            round_trips,
            p.judge_round_trips,
            p.device,
        )
        trained = judge.Judge(net.cpu())
        trained.save_pretrained(folder)
        held_images, held = world.draw_scenes(p.held_out, p.seed + 1)
        return {
            "final_loss": float(np.mean(losses[-50:])),
            "accuracy": judge.accuracy(trained, held_images, held),
            # The same held-out scenes through the VAE: what it reads in any picture.
            "accuracy_round_trip": judge.accuracy(
                trained, vae.round_trip(autoencoder.cpu(), held_images), held
            ),
        }

    # --- assembly ---------------------------------------------------------------------------

    def run(self, parts: tuple[str, ...] = PARTS) -> None:
        trainers = {
            "clip": self.train_clip,
            "vae": self.train_vae,
            "unet": self.train_unet,
            "judge": self.train_judge,
        }
        for part in PARTS:
            if part not in parts or self.done(part):
                continue
            missing = [d for d in DEPENDS[part] if not self.done(d)]
            if missing:
                raise RuntimeError(f"world part {part!r} needs {', '.join(missing)} first")
            (self.work / part).mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            threads = torch.get_num_threads()
            if self.p.device == "cpu":
                torch.set_num_threads(THREADS[part])
            try:
                info = trainers[part]()
            finally:
                torch.set_num_threads(threads)
            tqdm.write(
                f"world: {part} done in {time.perf_counter() - start:.0f} s: {json.dumps(info)}"
            )
            self.mark_done(part, info)

    def assemble(self, out: Path) -> dict:
        """Copy the done parts into `out` as the folders users load; returns world.json."""
        missing = [part for part in PARTS if not self.done(part)]
        if missing:
            raise RuntimeError(f"world parts not trained yet: {', '.join(missing)}")
        if out.exists():
            shutil.rmtree(out)
        (out / "clip").mkdir(parents=True)
        for item in (self.work / "clip").iterdir():
            if item.name != "done.json":
                shutil.copy2(item, out / "clip" / item.name)
        clip_dir = out / "clip"
        diffusion.save_pipeline(
            out / "sd",
            AutoencoderKL.from_pretrained(self.work / "vae"),
            UNet2DConditionModel.from_pretrained(self.work / "unet"),
            CLIPTextModel.from_pretrained(clip_dir),
            CLIPTokenizer.from_pretrained(clip_dir),
        )
        judge.Judge.from_pretrained(self.work / "judge").save_pretrained(out / "judge")
        summary = {
            "params": dataclasses.asdict(self.p),
            **{part: self.info(part) for part in PARTS},
        }
        write_text(out / "world.json", json.dumps(summary, indent=2) + "\n")
        return summary


# A world that trains in seconds, for tests and benchmarks: real shapes, almost no training.
MICRO = WorldParams(
    scenes=256,
    vocab_size=600,
    clip_steps=4,
    clip_batch=16,
    vae_steps=4,
    vae_batch=8,
    unet_steps=4,
    unet_batch=8,
    unet_warmup=1,
    unet_scenes=320,
    judge_steps=4,
    judge_batch=8,
    held_out=32,
)


def _train_part(job: tuple[WorldParams, Path, str]) -> None:
    p, work, part = job
    WorldBuild(p, work).run((part,))


def build_world(
    out: Path,
    p: WorldParams,
    work: Path,
    parts: tuple[str, ...] = PARTS,
    jobs: int = 1,
    retrain: tuple[str, ...] = (),
) -> dict | None:
    """Train the requested parts; once all are done, assemble `out` and clear `work`.

    Parts not in `retrain` whose fingerprint `out`'s world.json records are taken from `out`.
    With jobs > 1 the parts that need no other (vae, clip) train in that many worker
    processes first; each part runs with its own fixed thread count, so the weights are the
    same as with jobs = 1.
    """
    build = WorldBuild(p, work)
    taken = build.adopt(out, tuple(x for x in parts if x not in retrain))
    if taken:
        tqdm.write(f"world: {', '.join(taken)} unchanged, taken from {out}")
    independent = [x for x in ("vae", "clip") if x in parts and not build.done(x)]
    if jobs > 1 and len(independent) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(jobs, len(independent))) as pool:
            pool.map(_train_part, [(p, work, x) for x in independent], chunksize=1)
    build.run(parts)
    if not all(build.done(part) for part in PARTS):
        return None
    summary = build.assemble(out)
    shutil.rmtree(work)
    return summary


def build_micro_world(out: Path, seed: int = 0, jobs: int = 1) -> dict:
    """The MICRO world (seeded) in `out`: every folder a trained world has, in seconds."""
    work = out.parent / f".{out.name}-work"
    summary = build_world(out, dataclasses.replace(MICRO, seed=seed), work, jobs=jobs)
    assert summary is not None  # every part was requested
    return summary
