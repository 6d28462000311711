"""The `gap` stage: the bridges from image to text space of base.clip, for image prompts and
image rows.

Paired image/caption data (pipeline/data/pairs.py) through both CLIP towers gives the statistics of
every bridge (pipeline/prompting/images.py, `ModalityGap`): the mean text and image embeddings,
the mean text norm, the linear map, and the text embeddings of up to `gap.bank` training
captions for `text-projection`. They go to data/gap/modality_gap.safetensors (default bridge
`gap.bridge`) with a summary in data/gap/modality_gap.json: each bridge's paired cosine on a
held-out fifth of the pairs, fitted on the rest (the saved statistics use every pair).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.base.clip_encode import encode_texts
from pipeline.base.loaders import ClipText, load_clip
from pipeline.base.vision import ImageTower
from pipeline.config.params import Params
from pipeline.core.jsonio import write_json
from pipeline.core.names import BRIDGES
from pipeline.data.captions import read_split
from pipeline.data.pairs import WorldPairs, open_pairs
from pipeline.prompting.bridges import GAP_FILE, ModalityGap
from pipeline.prompting.bridges import GAP_SUMMARY as SUMMARY_FILE
from pipeline.world.embedded import World

# The share of the pairs each bridge's summary cosine is measured on (fitted on the rest).
HELD_OUT_FRACTION = 0.2


def text_embeddings(clip: ClipText, captions: list[str], batch: int = 64) -> torch.Tensor:
    """text_embeds [N, P] of captions."""
    return torch.cat(
        [
            encode_texts(clip, captions[b : b + batch]).text_embeds.float().cpu()
            for b in tqdm(range(0, len(captions), batch), desc="gap texts", unit="batch")
        ]
    )


def image_embeddings(tower: ImageTower, images: list[Image.Image], batch: int = 64) -> torch.Tensor:
    """image_embeds [N, P] of RGB images."""
    return torch.cat(
        [
            tower.embed(images[b : b + batch])
            for b in tqdm(range(0, len(images), batch), desc="gap images", unit="batch")
        ]
    )


def measure_gap(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    bridge: str,
) -> tuple[ModalityGap, dict]:
    """The statistics (fitted on every pair) and a summary: each bridge's paired cosine on a
    held-out HELD_OUT_FRACTION of the pairs (the last ones), fitted on the others."""
    cut = len(text_embeds) - max(1, round(HELD_OUT_FRACTION * len(text_embeds)))
    fitted = ModalityGap.measure(text_embeds[:cut], image_embeds[:cut], bank, temperature)
    held_text, held_image = text_embeds[cut:], image_embeds[cut:]
    gap = ModalityGap.measure(text_embeds, image_embeds, bank, temperature, bridge)
    summary = {
        "pairs": len(text_embeds),
        "bank": len(bank),
        "gap_norm": (gap.mean_text - gap.mean_image).norm().item(),
        "text_norm": gap.text_norm,
        "image_norm": image_embeds.norm(dim=-1).mean().item(),
        "held_out_pairs": len(held_text),
        "paired_cosine_held_out": {
            kind: F.cosine_similarity(held_text, fitted.correct(held_image, kind)).mean().item()
            for kind in BRIDGES
        },
    }
    return gap, summary


def run_gap_stage(
    params: Params, out_dir: Path, captions_dir: Path = Path("data/captions")
) -> dict:
    """Write out_dir/modality_gap.safetensors and .json (`gap.*`). The world: drawn scenes; a
    real CLIP: the pairs of `gap.source`, and without any only the .json saying so (image
    prompts then need --bridge none, and augment.image must be 0)."""
    base, g, device = params.base, params.gap, params.render.device
    out_dir.mkdir(parents=True, exist_ok=True)
    # The summary (its `computed` flag) goes first and comes back last: a stage killed in
    # between leaves no summary vouching for statistics that are gone or from other params.
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    (out_dir / GAP_FILE).unlink(missing_ok=True)
    world = World.of(base.clip, base.sd)
    pairs = WorldPairs(g.pairs, g.seed) if world else open_pairs(g)
    if pairs is None:
        summary = {
            "base_clip": base.clip,
            "computed": False,
            "why": f"gap.source {g.source!r} has no image/caption pairs: image prompts "
            "with this base.clip need --bridge none until it has",
        }
        write_json(out_dir / SUMMARY_FILE, summary)
        return summary
    clip = load_clip(base.clip, device=device)
    tower = ImageTower.load(base.clip, device=device)
    count = min(g.pairs, len(pairs))
    text = text_embeddings(clip, pairs.captions[:count])
    image = image_embeddings(tower, pairs.images(list(range(count))))
    bank = text_embeddings(clip, read_split(captions_dir, "train")[: g.bank])
    gap, summary = measure_gap(text, image, bank, g.temperature, g.bridge)
    gap.save(out_dir / GAP_FILE)  # atomic; the summary after it
    source = f"world scenes (seed {g.seed})" if world else g.source
    summary = {
        "base_clip": base.clip,
        "computed": True,
        "source": source,
        "bridge": g.bridge,
        **summary,
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary
