"""The world's CLIP: a small `CLIPModel` (text and vision towers with projections) trained
contrastively on scene/caption pairs.

A caption usually fits many scenes ("red circle" fits every scene with a red circle), so the
in-batch targets are not the identity: caption i's positives are all scenes j that have every
attribute it states (`scenes.satisfies`), and the cross-entropy is taken against that spread.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from pipeline.core.conventions import MAX_LENGTH
from pipeline.world import scenes as world
from pipeline.world.loop import step_generators, train_steps

# OpenAI CLIP's pixel statistics; the processor saved with the model uses them too.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipSizes:
    width: int = 128  # D: the text tower's hidden size, what the deprojectors reproduce
    text_layers: int = 4
    vision_layers: int = 2
    heads: int = 4
    patch: int = 8  # 32 x 32 images -> 16 patches


def build_clip(tokenizer: CLIPTokenizer, sizes: ClipSizes, seed: int) -> CLIPModel:
    # projection_dim in each tower's config too: CLIPTextModelWithProjection and
    # CLIPVisionModelWithProjection read it from there when they load this folder.
    common = dict(
        hidden_size=sizes.width,
        intermediate_size=4 * sizes.width,
        num_attention_heads=sizes.heads,
        hidden_act="quick_gelu",
        projection_dim=sizes.width,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_LENGTH,
            num_hidden_layers=sizes.text_layers,
            # A home-made vocabulary must name its special ids, or the model looks for EOS at
            # the highest id (the legacy eos_token_id = 2).
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        ),
        vision_config=dict(
            image_size=world.IMAGE_SIZE,
            patch_size=sizes.patch,
            num_hidden_layers=sizes.vision_layers,
            **common,
        ),
        projection_dim=sizes.width,  # square, as CLIP ViT-L/14's
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():
        table = model.text_model.embeddings.position_embedding.weight
        table.copy_(smooth_positions(table.shape[0], table.shape[1], table.std().item()))
    return model


def smooth_positions(positions: int, width: int, scale: float) -> torch.Tensor:
    """Position embeddings that change slowly along the sequence, as trained CLIP's do.

    Captions are short, so positions past ~30 are never trained; independent random rows
    there would make each padding state unpredictable from its neighbours, unlike real CLIP.
    """
    t = torch.arange(positions, dtype=torch.float32)[:, None] / positions
    frequencies = torch.rand(1, 8) * 3.0  # at most 3 periods over the context
    phases = torch.rand(1, 8) * 2 * torch.pi
    waves = torch.sin(2 * torch.pi * frequencies * t + phases)  # [positions, 8]
    table = waves @ torch.randn(8, width)
    return table * (scale / table.std())


def image_processor() -> CLIPImageProcessor:
    size = world.IMAGE_SIZE
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(PIXEL_MEAN),
        image_std=list(PIXEL_STD),
    )


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> normalised [N, 3, 32, 32], what the saved processor gives."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(PIXEL_MEAN)[:, None, None], torch.tensor(PIXEL_STD)[:, None, None]
    return (x - mean) / std


def token_batch(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Ids padded to the longest text: attention is causal, so the pooled EOS state is the
    same as at 77 positions, at a fraction of the cost."""
    return tokenizer(
        texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )["input_ids"]


def contrastive_loss(
    model: CLIPModel, input_ids: torch.Tensor, pixel_values: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets; positives [texts, images] bool."""
    text = F.normalize(model.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
    image = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * text @ image.T  # [B, B]
    target = positives.float()
    loss_text = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
    loss_image = F.cross_entropy(logits.T, (target / target.sum(0, keepdim=True)).T)
    return (loss_text + loss_image) / 2


def train_clip(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    images: np.ndarray,
    scenes: list[world.Scene],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    checkpoint: Path,
    device: str = "cpu",
) -> list[float]:
    """Contrastive training of `model` on `device`; batches are drawn on the CPU, so the
    same seed draws the same batches on every device."""
    model.to(device)
    bits = np.array([world.scene_bits(s) for s in scenes], dtype=np.int64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)

    def step_fn(step: int) -> torch.Tensor:
        rng, _ = step_generators(seed, step)
        rows = rng.choice(len(scenes), batch, replace=False)
        captioner = random.Random(int(rng.integers(2**31)))
        texts = [world.caption(scenes[i], captioner) for i in rows]
        required = np.array([world.required_bits(world.parse_prompt(t)) for t in texts])
        positives = torch.from_numpy(world.satisfies(bits[rows], required))
        return contrastive_loss(
            model,
            token_batch(tokenizer, texts).to(device),
            pixels(images[rows]).to(device),
            positives.to(device),
        )

    model.train()
    return train_steps("world: CLIP", {"model": model}, optimizer, steps, lr, step_fn, checkpoint)


@torch.no_grad()
def zero_shot_accuracy(
    model: CLIPModel, tokenizer: CLIPTokenizer, images: np.ndarray, scenes: list[world.Scene]
) -> dict[str, float]:
    """Single-object scenes against the prompts `<colour> <shape>`: colour and shape hits."""
    model.eval()
    prompts = [f"{c} {s}" for c, s in world.PAIRS]
    ids, pixel_values = token_batch(tokenizer, prompts), pixels(images)
    text = model.get_text_features(input_ids=ids.to(model.device)).pooler_output
    image = model.get_image_features(pixel_values=pixel_values.to(model.device)).pooler_output
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    best = (image @ text.T).argmax(dim=1).tolist()
    color = shape = 0
    for scene, k in zip(scenes, best, strict=True):
        thing = scene.things[0]
        color += world.PAIRS[k][0] == thing.color
        shape += world.PAIRS[k][1] == thing.shape
    return {"color": color / len(scenes), "shape": shape / len(scenes), "scenes": len(scenes)}
