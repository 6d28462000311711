"""The world's VAE and UNet recipes at a fixed budget, and the reference row they draw.

Two ablations, each arm a change of `world:` params against params.yaml's, all else equal:

- `--vae ARM ...`: each arm trains a VAE (world.vae_steps unless the arm changes it) and is
  scored on held-out drawn scenes: PSNR of the round trip (encode, posterior mean, decode)
  and what a judge reads in the round trips (exact reads, object recall) against what it
  reads in the drawings. The judge is `--judge` (default: the world's).
- `--unet ARM ...`: each arm trains a UNet for `--unet-steps` steps (the budget; `batch-x2`
  takes half the steps, so every arm sees as many images) on the latents of `--vae` (default:
  the world's VAE) and the world's CLIP, and is scored by reference adherence: the judged
  share of attributes found in pictures of `--prompts` held-out prompts per kind (single:
  tags in one text; multi: the same tags with commas), drawn exactly as `evaluate` draws its
  reference row (render.* settings, the same prompts and noise seeds), with a 95 % bootstrap
  interval over prompts and the paired difference to the first arm. Each arm also records the
  denoising loss of its UNet on 1,000 of its training scenes and on 1,000 held-out ones (the
  same noise and timesteps): a gap says it memorises its captions.

`--guidance G ...` sweeps the assembled world's classifier-free guidance scale: its reference
row over `--prompts` validation prompts of each object count (1, 2, 3; another seed than
evaluate's and none of its or the grids' prompts), the same prompts and noise at every scale;
`chosen` is the scale of the highest mean, the one render.guidance_scale should take.

`--world` scores the assembled world (models/world) the same way — its reference row over
`--prompts` prompts per kind — and, for the targets of 1- and 2-object prompts, over
`--prompts` held-out prompts of each object count (1, 2, 3) and kind; and its judge on
held-out drawings and their round trips.

    python -m pipeline.experiments.world_recipes --world --prompts 96
    python -m pipeline.experiments.world_recipes --guidance 1.5 2 3 4 5 7.5 --out g.json
    python -m pipeline.experiments.world_recipes --unet baseline min-snr-5 --unet-steps 1200
    python -m pipeline.experiments.world_recipes --vae baseline width-32 --out vae.json
    python -m pipeline.experiments.world_recipes --report --out docs/records/world_unet.json
    python -m pipeline.experiments.world_recipes --tiny   # seconds: a micro world, every path

Each arm's result is written to --out as soon as it is measured, and an arm already there
with the same settings is not trained again, so an interrupted run resumes arm by arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline.config.params import Params, load_params
from pipeline.core.jsonio import write_json
from pipeline.metrics.adherence import by_object_count, objects_key, prompt_seeds
from pipeline.metrics.intervals import mean_with_ci, paired_difference
from pipeline.metrics.records import ADHERENCE
from pipeline.sampling.sd import generate_images, load_pipeline
from pipeline.world import scenes as world
from pipeline.world import vae
from pipeline.world.build import THREADS, build_micro_world, train_unet_part, train_vae_part
from pipeline.world.config import WorldParams
from pipeline.world.diffusion import text_states
from pipeline.world.embedded import World
from pipeline.world.judge import Judge, accuracy

KINDS = ("single", "multi")
VALIDATION_SEED = 1  # added to evaluate.seed: the prompts and noise of the guidance sweep
VAE_ARMS = {  # name -> world.* overrides; values that scale a default are functions of it
    "baseline": {},
    "width-32": {"vae_width": 32},
    "layers-2": {"vae_layers": 2},
    "steps-x2": {"vae_steps": lambda p: 2 * p.vae_steps},
    "lr-x0.5": {"vae_lr": lambda p: p.vae_lr / 2},
}
UNET_ARMS = {
    "baseline": {},
    "min-snr-5": {"unet_min_snr_gamma": 5.0},
    "min-snr-0": {"unet_min_snr_gamma": 0.0},
    "lr-x2": {"unet_lr": lambda p: 2 * p.unet_lr},
    "lr-x0.5": {"unet_lr": lambda p: p.unet_lr / 2},
    "ema-0.99": {"unet_ema_decay": 0.99},
    "warmup-0": {"unet_warmup": 1},
    "batch-x2": {
        "unet_batch": lambda p: 2 * p.unet_batch,
        "unet_steps": lambda p: p.unet_steps // 2,
    },
    "width-48": {"unet_width": 48},
    "captions-4": {"captions_per_scene": 4},
    "scenes-x4": {"unet_scenes": lambda p: 4 * p.unet_scenes},
    "min-snr-5-scenes-x4": {"unet_min_snr_gamma": 5.0, "unet_scenes": lambda p: 4 * p.unet_scenes},
}


def arm_params(base: WorldParams, overrides: dict) -> WorldParams:
    return dataclasses.replace(
        base, **{k: v(base) if callable(v) else v for k, v in overrides.items()}
    )


def changed(p: WorldParams, base: WorldParams) -> dict:
    return {
        f.name: getattr(p, f.name)
        for f in dataclasses.fields(p)
        if getattr(p, f.name) != getattr(base, f.name)
    }


# --- the judge on round trips ----------------------------------------------------------------


def judge_reads(judge: Judge, autoencoder: AutoencoderKL, count: int, seed: int) -> dict:
    """PSNR of round trips of `count` held-out drawn scenes, and the judge's reads of the
    drawings (`crisp`) and of their round trips."""
    images, drawn = world.draw_scenes(count, seed)
    trips = vae.round_trip(autoencoder, images)
    return {
        "psnr_db": vae.psnr(images, trips),
        "crisp": accuracy(judge, images, drawn),
        "round_trip": accuracy(judge, trips, drawn),
    }


# --- the reference row ----------------------------------------------------------------------


def grid_prompts(params: Params) -> set[str]:
    """The grid's prompts, which `evaluate` excludes from its held-out prompts."""
    single, multi = params.render.prompts(True)
    return set(single) | set(multi)


def judged_adherence(pipe, judge: Judge, render, prompts: list[str], seed: int) -> np.ndarray:
    """[len(prompts)] adherence of the reference row's pictures of `prompts`: their CLIP
    states, negative "", the noise seeds of `seed`, `render` settings."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    images = generate_images(
        pipe,
        text_states(text_encoder, tokenizer, prompts),
        text_states(text_encoder, tokenizer, [""]),
        render,
        prompt_seeds(seed, len(prompts)),
    )
    return np.array(judge.adherence(images, prompts))


def reference_scores(pipe, judge: Judge, params: Params, count: int) -> dict[str, np.ndarray]:
    """{kind: adherence [count]} of the reference row, as `evaluate` draws it: the held-out
    prompts (the grid's excluded), their CLIP states, the same seeds."""
    e = params.evaluate
    prompts = World.held_out_prompts(count, e.seed, grid_prompts(params))
    return {
        kind: judged_adherence(pipe, judge, params.render, prompts[kind], e.seed) for kind in KINDS
    }


def prompts_by_objects(count: int, seed: int, exclude: set[str]) -> dict[int, dict]:
    """{objects: {kind: prompts}}: the first `count` held-out scenes (World.held_out_scenes,
    the grid's prompts excluded) with 1, 2 and 3 objects, described as each kind."""
    scenes: list[world.Scene] = []
    while min((sum(len(s.things) == k for s in scenes) for k in (1, 2, 3)), default=0) < count:
        scenes = World.held_out_scenes(2 * len(scenes) + 6 * count, seed, exclude)
    out = {}
    for k in (1, 2, 3):
        picked = [s for s in scenes if len(s.things) == k][:count]
        out[k] = {
            "single": [World.describe(s, " ") for s in picked],
            "multi": [World.describe(s, ", ") for s in picked],
        }
    return out


def rows_by_objects(
    pipe,
    judge: Judge,
    render,
    by_objects: dict[int, dict],
    seed: int,
    kinds: tuple[str, ...] = KINDS,
) -> dict:
    """{kind: {"N_objects": mean adherence with interval}} of the prompts of each object count
    (`prompts_by_objects`), drawn with `render` settings from the noise seeds of `seed`."""
    out: dict[str, dict] = {kind: {} for kind in kinds}
    for k, prompts in by_objects.items():
        for kind in kinds:
            values = judged_adherence(pipe, judge, render, prompts[kind], seed)
            out[kind][objects_key(k)] = {
                **mean_with_ci(ADHERENCE, values, seed),
                "prompts": len(values),
            }
    return out


def validation_prompts(params: Params, count: int) -> dict[int, dict]:
    """`prompts_by_objects` of another seed than evaluate's, without any of the prompts that
    evaluate, the grids or `--world` score: where a sampling setting (the guidance scale) is
    chosen, so that no reported row is tuned on its own prompts."""
    seed, exclude = params.evaluate.seed, grid_prompts(params)
    scored = {
        *exclude,
        *(p for kind in World.held_out_prompts(count, seed, exclude).values() for p in kind),
    }
    for by_kind in prompts_by_objects(count, seed, exclude).values():
        scored |= {p for kind in by_kind.values() for p in kind}
    return prompts_by_objects(count, seed + VALIDATION_SEED, scored)


def summary(
    scores: dict[str, np.ndarray],
    against: dict[str, np.ndarray] | None,
    objects: list[int],
    seed: int,
) -> dict:
    out = {}
    for kind, values in scores.items():
        row = {
            **mean_with_ci(ADHERENCE, values, seed),
            "prompts": len(values),
            **by_object_count(values, objects, seed),
        }
        if against is not None:  # the same prompts and seeds: a paired difference
            row["vs_first_arm"] = paired_difference(np.mean, [values], [against[kind]], seed)
        out[kind] = row
    return out


# --- the ablations --------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        params: Params,
        world_dir: Path,
        vae_dir: Path,
        judge_dir: Path,
        work: Path,
        out: Path,
        prompts: int,
    ) -> None:
        self.params, self.world_dir, self.vae_dir = params, world_dir, vae_dir
        self.judge = Judge.from_pretrained(judge_dir)
        self.work, self.out, self.prompts = work, out, prompts
        self.results = json.loads(out.read_text()) if out.is_file() else {}
        self._data: tuple[np.ndarray, list[world.Scene]] | None = None

    @property
    def data(self) -> tuple[np.ndarray, list[world.Scene]]:
        if self._data is None:
            self._data = world.draw_scenes(self.params.world.scenes, self.params.world.seed)
        return self._data

    def save(self) -> None:
        write_json(self.out, self.results)
        self.results = json.loads(self.out.read_text())  # as stored: rounded

    def objects(self) -> list[int]:
        held_out = World.held_out_prompts(
            self.prompts, self.params.evaluate.seed, grid_prompts(self.params)
        )
        return [World.objects(p) for p in held_out["single"]]

    def pipeline(self, unet=None, autoencoder=None):
        pipe = load_pipeline(str(self.world_dir / "sd"), self.params.render)
        if unet is not None:
            pipe.unet = unet.eval()
        if autoencoder is not None:
            pipe.vae = autoencoder.eval()
        return pipe

    def score_world(self) -> None:
        """The assembled world: its reference row and its judge."""
        w = self.params.world
        pipe = self.pipeline()
        scores = reference_scores(pipe, self.judge, self.params, self.prompts)
        autoencoder = AutoencoderKL.from_pretrained(self.world_dir / "sd" / "vae")
        self.results["world"] = {
            "reference": summary(scores, None, self.objects(), self.params.evaluate.seed),
            "per_prompt": {k: v.tolist() for k, v in scores.items()},
            "reference_by_objects": rows_by_objects(
                pipe,
                self.judge,
                self.params.render,
                prompts_by_objects(
                    self.prompts, self.params.evaluate.seed, grid_prompts(self.params)
                ),
                self.params.evaluate.seed,
            ),
            "judge": judge_reads(self.judge, autoencoder, w.held_out, w.seed + 1),
        }
        self.save()

    def sweep_guidance(self, scales: list[float]) -> None:
        """The assembled world's reference row (single kind) over the validation prompts of
        each object count at each classifier-free guidance scale; the same prompts and noise
        for every scale. `chosen`: the scale of the highest mean over all of them."""
        sweep = self.results.setdefault("guidance", {"scales": {}})["scales"]
        by_objects = validation_prompts(self.params, self.prompts)
        seed = self.params.evaluate.seed + VALIDATION_SEED
        pipe = self.pipeline()
        for scale in scales:
            if str(scale) in sweep:
                print(f"guidance {scale}: already measured")
                continue
            render = dataclasses.replace(self.params.render, guidance_scale=scale)
            sweep[str(scale)] = rows_by_objects(
                pipe, self.judge, render, by_objects, seed, ("single",)
            )["single"]
            self.results["guidance"]["chosen"] = max(
                sweep, key=lambda g: np.mean([r[ADHERENCE] for r in sweep[g].values()])
            )
            self.save()
            sweep = self.results["guidance"]["scales"]
            print(f"guidance {scale}: {json.dumps(sweep[str(scale)])}")

    def run_arms(self, section: str, arms: list[str], table: dict, train) -> None:
        base = self.params.world
        for name in arms:
            p = arm_params(base, table[name])
            settings = changed(p, base)
            if self.results.get(section, {}).get(name, {}).get("settings") == settings:
                print(f"{section} {name}: already measured")
                continue
            torch.set_num_threads(THREADS[section] if p.device == "cpu" else 1)
            start = time.perf_counter()
            result = {"settings": settings, **train(name, p, start)}
            self.results.setdefault(section, {})[name] = result
            self.save()
            print(f"{section} {name}: {json.dumps(result)[:400]}")

    def train_vae_arm(self, name: str, p: WorldParams, start: float) -> dict:
        model, info = train_vae_part(p, self.data[0], self.work / f"vae-{name}.pt")
        seconds = time.perf_counter() - start
        return {
            "train_seconds": round(seconds),
            "final_loss": info["final_loss"],
            **judge_reads(self.judge, model, p.held_out, p.seed + 1),
        }

    def train_unet_arm(self, name: str, p: WorldParams, start: float) -> dict:
        ema, info = train_unet_part(
            p, self.world_dir / "clip", self.vae_dir, self.work / f"unet-{name}.pt"
        )
        seconds = time.perf_counter() - start
        ema.save_pretrained(self.work / f"unet-{name}")  # a world can be assembled with it
        autoencoder = AutoencoderKL.from_pretrained(self.vae_dir)
        scores = reference_scores(
            self.pipeline(ema, autoencoder), self.judge, self.params, self.prompts
        )
        first = next(iter(self.results.get("unet", {}).items()), None)
        against = {k: np.array(v) for k, v in first[1]["per_prompt"].items()} if first else None
        return {
            "train_seconds": round(seconds),
            **info,
            "reference": summary(scores, against, self.objects(), self.params.evaluate.seed),
            "per_prompt": {k: v.tolist() for k, v in scores.items()},
        }


def interval_text(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_ci95") or (float("nan"), float("nan"))
    return f"{row[key]:.3f} [{low:.3f}, {high:.3f}]"


def print_report(results: dict) -> None:
    """The tables of the README, as markdown."""
    if "world" in results:
        w = results["world"]
        print(
            "| world | "
            + " | ".join(f"{k} ({kind})" for kind in KINDS for k in w["reference_by_objects"][kind])
            + " |"
        )
        print("| --- |" + " ---: |" * 3 * len(KINDS))
        print(
            "| reference adherence | "
            + " | ".join(
                interval_text(row, ADHERENCE)
                for kind in KINDS
                for row in w["reference_by_objects"][kind].values()
            )
            + " |"
        )
        for reads in ("crisp", "round_trip"):
            r = w["judge"][reads]
            print(
                f"judge on {reads}: exact {r['exact']:.3f}, object recall "
                f"{r['object_recall']:.3f}, precision {r['object_precision']:.3f}"
            )
        print(f"VAE round-trip PSNR {w['judge']['psnr_db']:.2f} dB\n")
    if results.get("guidance"):
        sweep = results["guidance"]["scales"]
        counts = list(next(iter(sweep.values())))
        print("| guidance scale | " + " | ".join(f"{k} (validation)" for k in counts) + " |")
        print("| ---: |" + " ---: |" * len(counts))
        for scale, rows in sweep.items():
            mark = " (chosen)" if scale == results["guidance"]["chosen"] else ""
            print(
                f"| {scale}{mark} | "
                + " | ".join(interval_text(rows[k], ADHERENCE) for k in counts)
                + " |"
            )
        print()
    if results.get("vae"):
        print(
            "| VAE arm | settings | train s | final loss | PSNR dB | judge exact: crisp / "
            "round trip | object recall: round trip |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for name, r in results["vae"].items():
            print(
                f"| {name} | {json.dumps(r['settings'])} | {r['train_seconds']} | "
                f"{r['final_loss']:.4f} | {r['psnr_db']:.2f} | {r['crisp']['exact']:.3f} / "
                f"{r['round_trip']['exact']:.3f} | {r['round_trip']['object_recall']:.3f} |"
            )
        print()
    if results.get("unet"):
        print(
            "| UNet arm | settings | train s | final loss | "
            + " | ".join(f"{kind} adherence | {kind} vs first arm" for kind in KINDS)
            + " |"
        )
        print("| --- | --- | ---: | ---: |" + " ---: | ---: |" * len(KINDS))
        for name, r in results["unet"].items():
            cells = []
            for kind in KINDS:
                row = r["reference"][kind]
                paired = row.get("vs_first_arm")
                cells += [
                    interval_text(row, ADHERENCE),
                    f"{paired['difference']:+.3f} [{paired['difference_ci95'][0]:+.3f}, "
                    f"{paired['difference_ci95'][1]:+.3f}]"
                    if paired
                    else "—",
                ]
            print(
                f"| {name} | {json.dumps(r['settings'])} | {r['train_seconds']} | "
                f"{r['final_loss']:.4f} | " + " | ".join(cells) + " |"
            )


def tiny(out: Path) -> dict:
    """Every path at toy sizes: a micro world, two arms of each ablation, 4 prompts."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world_dir = root / "world"
        build_micro_world(world_dir)
        p = load_params(Path("params.yaml"))
        micro = json.loads((world_dir / "world.json").read_text())["params"]
        p = dataclasses.replace(
            p, world=WorldParams(**micro), render=dataclasses.replace(p.render, steps=2)
        )
        bench = Bench(
            p, world_dir, world_dir / "sd" / "vae", world_dir / "judge", root, out, prompts=4
        )
        bench.score_world()
        bench.sweep_guidance([1.0, 3.0])
        bench.run_arms("vae", ["baseline", "width-32"], VAE_ARMS, bench.train_vae_arm)
        bench.run_arms("unet", ["baseline", "min-snr-5"], UNET_ARMS, bench.train_unet_arm)
        return bench.results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--world-dir", type=Path, default=Path("models/world"))
    parser.add_argument(
        "--world", action="store_true", help="score the assembled world's reference row and judge"
    )
    parser.add_argument(
        "--guidance",
        nargs="*",
        type=float,
        default=[],
        help="sweep the assembled world's guidance scale over these values on "
        "validation prompts (another seed, none of the scored ones)",
    )
    parser.add_argument("--vae", nargs="*", default=[], choices=sorted(VAE_ARMS))
    parser.add_argument("--unet", nargs="*", default=[], choices=sorted(UNET_ARMS))
    parser.add_argument(
        "--unet-steps",
        type=int,
        default=1200,
        help="the UNet arms' budget (world.unet_steps for every arm)",
    )
    parser.add_argument(
        "--vae-dir", type=Path, help="the VAE of the UNet arms [default: WORLD_DIR/sd/vae]"
    )
    parser.add_argument(
        "--judge-dir", type=Path, help="the judge of every score [default: WORLD_DIR/judge]"
    )
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts per kind")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("data/world-recipes-work"),
        help="checkpoints of the arm in training",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/records/world_recipes.json"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes, every path, seconds")
    parser.add_argument("--report", action="store_true", help="print the tables of --out and stop")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(args.out.read_text())
        print_report(results)
        return results
    if args.tiny:
        results = tiny(args.out)
        print_report(results)
        return results
    params = load_params(args.params)
    params = dataclasses.replace(
        params, world=dataclasses.replace(params.world, unet_steps=args.unet_steps)
    )
    bench = Bench(
        params,
        args.world_dir,
        args.vae_dir or args.world_dir / "sd" / "vae",
        args.judge_dir or args.world_dir / "judge",
        args.work,
        args.out,
        args.prompts,
    )
    if args.world:
        bench.score_world()
    if args.guidance:
        bench.sweep_guidance(args.guidance)
    bench.run_arms("vae", args.vae, VAE_ARMS, bench.train_vae_arm)
    bench.run_arms("unet", args.unet, UNET_ARMS, bench.train_unet_arm)
    print_report(bench.results)
    return bench.results


if __name__ == "__main__":
    main()
