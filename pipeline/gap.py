"""The `gap` stage: modality-gap statistics of base.clip for image prompts.

Paired image/caption data through both CLIP towers gives the mean text and image embeddings
and the mean text-embedding norm (pipeline/image_prompts.py, `ModalityGap`), written to
data/gap/modality_gap.safetensors with a summary (paired cosine before and after the
correction) in data/gap/modality_gap.json. The builtin base uses drawn world scenes and their
captions; a real CLIP, the image/caption pairs of `gap.folder`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.base_models import ClipText, load_clip
from pipeline.clip_encode import encode_texts
from pipeline.image_prompts import GAP_FILE, ImageTower, ModalityGap, folder_pairs, pair_images
from pipeline.jsonio import write_json
from pipeline.params import Params
from pipeline.world.embedded import World


def measure_gap(clip: ClipText, tower: ImageTower, images: list[Image.Image],
                captions: list[str], batch: int = 64) -> tuple[ModalityGap, dict]:
    """The statistics and a summary: paired cosine before and after the correction."""
    text, image = [], []
    for begin in tqdm(range(0, len(images), batch), desc="gap", unit="batch"):
        text.append(encode_texts(clip, captions[begin:begin + batch]).text_embeds.float().cpu())
        image.append(tower.embed(images[begin:begin + batch]))
    text_embeds, image_embeds = torch.cat(text), torch.cat(image)
    gap = ModalityGap.measure(text_embeds, image_embeds)
    summary = {
        "pairs": len(captions),
        "gap_norm": (gap.mean_text - gap.mean_image).norm().item(),
        "text_norm": gap.text_norm,
        "image_norm": image_embeds.norm(dim=-1).mean().item(),
        "paired_cosine": F.cosine_similarity(text_embeds, image_embeds).mean().item(),
        "paired_cosine_corrected":
            F.cosine_similarity(text_embeds, gap.correct(image_embeds)).mean().item(),
    }
    return gap, summary


def run_gap_stage(params: Params, out_dir: Path) -> dict:
    """Write out_dir/modality_gap.safetensors and .json (`gap.*`). The world: drawn scenes; a
    real CLIP: the pairs in `gap.folder`, and without any only the .json saying so (image
    prompts then need --no-gap-correction)."""
    base, g, device = params.base, params.gap, params.render.device
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / GAP_FILE).unlink(missing_ok=True)
    world = World.of(base.clip, base.sd)
    if world is None and not pair_images(Path(g.folder)):
        summary = {"base_clip": base.clip, "computed": False,
                   "why": f"gap.folder {g.folder!r} has no image/caption pairs: image prompts "
                          "with this base.clip need --no-gap-correction until it has"}
        write_json(out_dir / "modality_gap.json", summary)
        return summary
    clip = load_clip(base.clip, device=device)
    tower = ImageTower.load(base.clip, device=device)
    images, captions = world.pairs(g.pairs, g.seed) if world \
        else folder_pairs(Path(g.folder), g.pairs)
    gap, summary = measure_gap(clip, tower, images, captions)
    gap.save(out_dir / GAP_FILE)
    source = f"world scenes (seed {g.seed})" if world else g.folder
    summary = {"base_clip": base.clip, "computed": True, "source": source, **summary}
    write_json(out_dir / "modality_gap.json", summary)
    return summary
