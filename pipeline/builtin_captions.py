"""Deterministic caption generator in the styles of the article's prompts.

Two styles are mixed, as in the study's training set: anime-style tag lists
(`1girl red hair blue eye black skirt`, `cat maid`) and short plain-English phrases
(`1boy 1girl in class room`). The vocabulary contains every word of the article's six
comparison prompts, so the grid is in-distribution for the embedded default.
"""

from __future__ import annotations

import random

SUBJECTS = ["1girl", "1boy", "2girls", "2boys", "1girl 1boy", "1boy 1girl", "cat", "dog",
            "girl", "boy", "woman", "man", "maid", "witch", "knight", "robot", "fox", "bird"]
COLORS = ["red", "blue", "black", "white", "green", "yellow", "pink", "purple", "silver",
          "brown", "orange", "grey", "gold"]
HAIR = ["hair", "long hair", "short hair", "twintails", "ponytail", "braid"]
EYES = ["eye", "eyes"]
CLOTHES = ["skirt", "dress", "shirt", "jacket", "hat", "ribbon", "school uniform", "kimono",
           "apron", "boots", "gloves", "scarf", "sailor collar", "maid outfit", "hoodie"]
TRAITS = ["cat ears", "cat tail", "smile", "open mouth", "blush", "looking at viewer", "solo",
          "standing", "sitting", "holding book", "holding cup", "from side", "upper body",
          "full body", "closed eyes", "wings", "glasses", "maid", "cat"]
PLACES = ["class room", "classroom", "park", "forest", "beach", "city street", "library",
          "cafe", "garden", "bedroom", "kitchen", "shrine", "castle", "train station", "rooftop"]
PREPOSITIONS = ["in", "at", "near", "in front of", "inside"]
ADJECTIVES = ["small", "happy", "sleepy", "cute", "old", "young", "quiet", "bright", "dark"]
ACTIONS = ["sitting", "standing", "walking", "reading", "sleeping", "running", "eating",
           "playing", "singing", "waiting"]
STYLES = ["masterpiece", "best quality", "illustration", "watercolor", "sketch", "anime",
          "night", "sunset", "rain", "snow", "simple background", "white background"]


def _tag_list(rng: random.Random) -> str:
    tags = [rng.choice(SUBJECTS)]
    makers = [
        lambda: f"{rng.choice(COLORS)} {rng.choice(HAIR)}",
        lambda: f"{rng.choice(COLORS)} {rng.choice(EYES)}",
        lambda: f"{rng.choice(COLORS)} {rng.choice(CLOTHES)}",
        lambda: rng.choice(CLOTHES),
        lambda: rng.choice(TRAITS),
        lambda: f"{rng.choice(PREPOSITIONS)} {rng.choice(PLACES)}",
        lambda: rng.choice(STYLES),
    ]
    for _ in range(rng.randint(1, 6)):
        tag = rng.choice(makers)()
        if tag not in tags:
            tags.append(tag)
    separator = rng.choice([" ", ", "])
    return separator.join(tags)


def _phrase(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.5:
        subject = f"{rng.choice(['a', 'the', ''])} {rng.choice(ADJECTIVES)} {subject}".strip()
    parts = [subject]
    if rng.random() < 0.6:
        parts.append(rng.choice(ACTIONS))
    parts.append(f"{rng.choice(PREPOSITIONS)} {rng.choice(PLACES)}")
    if rng.random() < 0.3:
        parts.append(f"with {rng.choice(COLORS)} {rng.choice(CLOTHES)}")
    return " ".join(parts)


def _pair(rng: random.Random) -> str:
    # Two-word compounds like the article's `cat maid`.
    return f"{rng.choice(SUBJECTS + TRAITS)} {rng.choice(TRAITS + CLOTHES)}"


def generate_captions(count: int, seed: int) -> list[str]:
    """`count` captions (duplicates possible; cleaning removes them), same seed → same list."""
    rng = random.Random(seed)
    styles = [_tag_list, _tag_list, _phrase, _pair]
    return [rng.choice(styles)(rng) for _ in range(count)]
