"""The judge: a small CNN, independent of CLIP, that reads a 32 x 32 image back into its
background colour and, at each of the five places an object can stand, what stands there
(nothing, or one of the 24 colour-shape pairs).

It is trained on drawn scenes only (never on generated images): the drawings and their round
trips through the world's VAE (every generated picture is decoded by it), with blur, noise and
colour jitter so the slightly soft pictures of a small diffusion model stay readable. It never
sees a UNet sample, so it cannot learn the UNet's mistakes.
`adherence(image, prompt)` is the fraction of the attributes a prompt states (its background
colour, each object as colour + shape, or as the colour or shape alone where only that is
named) that the judge finds in the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.core.atomic import save_tensors, write_text
from pipeline.core.errors import DeprojectorError, read_json, read_safetensors
from pipeline.world import scenes as world
from pipeline.world.loop import step_generators, train_steps

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
Images = np.ndarray | list[Image.Image]  # uint8 [N, 32, 32, 3], or PIL images of any size


class JudgeError(DeprojectorError, ValueError):
    """The judge's folder is damaged or from another version of the world."""


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            conv(3, w),
            nn.MaxPool2d(2),
            conv(w, 2 * w),
            nn.MaxPool2d(2),
            conv(2 * w, 4 * w),
            nn.MaxPool2d(2),
        )  # [N, 4w, 4, 4]
        outputs = len(world.COLOR_NAMES) + len(PLACES) * (1 + len(world.PAIRS))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(), nn.Linear(256, outputs)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, 3, 32, 32] in [0, 1] -> background logits [N, 6] and, per place, logits of
        nothing / each colour-shape pair [N, 5, 25]."""
        out = self.head(self.features(x - 0.5))
        n_bg = len(world.COLOR_NAMES)
        return out[:, :n_bg], out[:, n_bg:].view(len(x), len(PLACES), 1 + len(world.PAIRS))


PLACES = tuple(world.PLACES)


def targets(scenes: list[world.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Background index [N] and, per place, 0 (nothing) or 1 + the pair's index [N, 5]."""
    background = torch.tensor([world.COLOR_NAMES.index(s.background) for s in scenes])
    places = torch.zeros(len(scenes), len(PLACES), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for t in scene.things:
            places[i, PLACES.index(t.place)] = 1 + world.PAIRS.index((t.color, t.shape))
    return background, places


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur by a random amount, jitter brightness and colour, add noise: what a small
    diffusion model's pictures look like next to the crisp drawings."""
    n = len(x)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    x = x + mix * (blurred - x)
    x = x * (1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 2)
    x = x + 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def train_judge(
    net: JudgeNet,
    images: np.ndarray,
    scenes: list[world.Scene],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    checkpoint: Path,
    round_trips: np.ndarray | None = None,
    round_trip_share: float = 0.0,
    device: str = "cpu",
) -> list[float]:
    """Train on `device`. images and round_trips: uint8 [N, 32, 32, 3], the drawn scenes and
    the same scenes through the VAE; each row of a batch is a round trip with probability
    `round_trip_share`. Batches and augmentations are drawn on the CPU."""
    if round_trip_share > 0 and (round_trips is None or round_trips.shape != images.shape):
        raise ValueError("round_trip_share > 0 needs one round trip per image")
    background, places = targets(scenes)
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)

    def step_fn(step: int) -> torch.Tensor:
        rng, gen = step_generators(seed, step)
        rows = rng.choice(len(scenes), batch, replace=False)
        x = images[rows]
        if round_trip_share > 0:
            use = rng.random(batch) < round_trip_share
            x = np.where(use[:, None, None, None], round_trips[rows], x)
        bg_logits, place_logits = net(augment(to_input(x), gen).to(device))
        return F.cross_entropy(bg_logits, background[rows].to(device)) + F.cross_entropy(
            place_logits.flatten(0, 1), places[rows].flatten().to(device)
        )

    net.train()
    return train_steps("world: judge", {"judge": net}, optimizer, steps, lr, step_fn, checkpoint)


class Judge:
    """A trained judge, loaded from its folder."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Judge:
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"no judge in {folder}: {name} is missing")
        rebuild = "rebuild the world (`deprojector world`)"
        config = read_json(folder / CONFIG_FILE, JudgeError, rebuild)
        if config.get("colors") != list(world.COLOR_NAMES) or config.get("shapes") != list(
            world.SHAPES
        ):
            raise JudgeError(
                f"{folder / CONFIG_FILE}: the judge was trained for other "
                f"colours or shapes than this version of the world; {rebuild}"
            )
        width = config.get("width")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise JudgeError(
                f'{folder / CONFIG_FILE}: "width" must be a positive integer, '
                f"found {width!r}; {rebuild}"
            )
        net = JudgeNet(width)
        tensors = read_safetensors(folder / WEIGHTS_FILE, JudgeError, rebuild)
        try:
            net.load_state_dict(tensors)
        except RuntimeError as err:
            raise JudgeError(
                f"{folder / WEIGHTS_FILE}: its tensors do not fit "
                f"{folder / CONFIG_FILE} ({' '.join(str(err).split())}); "
                f"{rebuild}"
            ) from err
        return cls(net)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "width": self.net.head[1].in_features // 64,
            "colors": list(world.COLOR_NAMES),
            "shapes": list(world.SHAPES),
            "image_size": world.IMAGE_SIZE,
        }
        write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        save_tensors(
            folder / WEIGHTS_FILE, {k: v.contiguous() for k, v in self.net.state_dict().items()}
        )

    @torch.no_grad()
    def probabilities(self, images: Images) -> tuple[np.ndarray, np.ndarray]:
        """Background probabilities [N, 6] and, per place, of nothing or each pair [N, 5, 25]."""
        if isinstance(images, list):
            size = (world.IMAGE_SIZE, world.IMAGE_SIZE)
            images = np.stack(
                [np.asarray(im.convert("RGB").resize(size, Image.Resampling.BOX)) for im in images]
            )
        bg, places = self.net(to_input(images))
        return bg.softmax(-1).numpy(), places.softmax(-1).numpy()

    def read(self, images: Images) -> list[world.Stated]:
        """What the judge sees in each image: background and objects (colour, shape)."""
        bg, places = self.probabilities(images)
        return [
            world.Stated(
                world.COLOR_NAMES[int(b.argmax())],
                [world.PAIRS[k - 1] for k in p.argmax(-1) if k > 0],
            )
            for b, p in zip(bg, places, strict=True)
        ]

    def adherence(self, images: Images, prompts: list[str]) -> list[float]:
        """Per image, the fraction of its prompt's stated attributes the judge finds."""
        return [
            found_fraction(seen, world.parse_prompt(prompt))
            for seen, prompt in zip(self.read(images), prompts, strict=True)
        ]


def found_fraction(seen: world.Stated, stated: world.Stated) -> float:
    """Fraction of `stated` attributes present in `seen` (1.0 when nothing is stated)."""
    if stated.count() == 0:
        return 1.0
    found = int(stated.background is not None and stated.background == seen.background)
    for color, shape in stated.objects:
        found += any(
            (color is None or c == color) and (shape is None or s == shape) for c, s in seen.objects
        )
    return found / stated.count()


def accuracy(judge: Judge, images: np.ndarray, scenes: list[world.Scene]) -> dict[str, float]:
    """On drawn scenes: background accuracy, object recall and precision, exact reads."""
    seen = judge.read(images)
    bg = np.mean([s.background == sc.background for s, sc in zip(seen, scenes, strict=True)])
    true = [{(t.color, t.shape) for t in sc.things} for sc in scenes]
    got = [set(s.objects) for s in seen]
    hits = sum(len(t & g) for t, g in zip(true, got, strict=True))
    return {
        "background": float(bg),
        "object_recall": hits / sum(len(t) for t in true),
        "object_precision": hits / max(1, sum(len(g) for g in got)),
        "exact": float(np.mean([t == g for t, g in zip(true, got, strict=True)])),
        "scenes": len(scenes),
    }
