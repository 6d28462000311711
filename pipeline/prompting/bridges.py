"""Bridges from CLIP's image space to its text space, and the one formula from an image to the
pooled embedding a deprojector reads (docs/architectures.md, image prompts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.atomic import save_tensors
from pipeline.core.errors import read_safetensors
from pipeline.core.names import BRIDGES, GAP_FILE
from pipeline.prompting.images import ImagePromptError

GAP_SUMMARY = "modality_gap.json"  # the gap stage's summary (`computed`), written last


# The linear bridge's ridge: λ = RIDGE · mean variance of the centred image embeddings; it keeps
# the fit stable when there are fewer pairs than dimensions (a small folder for CLIP-L).
RIDGE = 1e-2


@dataclass
class ModalityGap:
    """Statistics of paired text and image embeddings [P] and the bridges they define.

    A bridge maps image_embeds [N, P] to where the text_embeds of their captions lie:
    - `none`: as they are;
    - `mean-shift`: x − mean_image + mean_text (Liang et al. 2022, "Mind the Gap");
    - `linear`: (x − mean_image) A + mean_text, A [P, P] least squares of the centred text
      embeddings on the centred image embeddings with a ridge, in closed form;
    - `text-projection`: Σ_i softmax(cos(mean-shift(x), t_i) / temperature) t_i over `bank`
      [M, P], the unit text embeddings of training captions (DeCap, Li et al. 2023, projects
      onto its text memory the same way, on the raw image embedding);
    every bridge but `none` then scaled to the mean text norm. `bridge` is the default.
    """

    mean_text: torch.Tensor
    mean_image: torch.Tensor
    text_norm: float
    linear: torch.Tensor | None = None  # [P, P]
    bank: torch.Tensor | None = None  # [M, P], unit rows
    temperature: float = 0.01
    bridge: str = "mean-shift"

    def __post_init__(self) -> None:
        if self.bridge not in BRIDGES:
            raise ImagePromptError(f"unknown bridge {self.bridge!r} (known: {', '.join(BRIDGES)})")

    def correct(self, image_embeds: torch.Tensor, bridge: str | None = None) -> torch.Tensor:
        """[..., P] image embeddings brought across the gap by `bridge` (None: the default),
        computed in image_embeds' dtype."""
        kind = bridge or self.bridge
        if kind not in BRIDGES:
            raise ImagePromptError(f"unknown bridge {kind!r} (known: {', '.join(BRIDGES)})")
        if kind == "none":
            return image_embeds
        centred = image_embeds - self.mean_image
        if kind == "mean-shift":
            bridged = centred + self.mean_text
        elif kind == "linear":
            bridged = centred @ self._needs("linear").to(centred) + self.mean_text
        else:
            bank = self._needs("bank").to(centred)
            query = torch.nn.functional.normalize(centred + self.mean_text, dim=-1)
            bridged = torch.softmax(query @ bank.T / self.temperature, dim=-1) @ bank
        return bridged * (self.text_norm / bridged.norm(dim=-1, keepdim=True))

    def _needs(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ImagePromptError(
                f"these modality-gap statistics have no {name!r} tensor "
                "(written before that bridge existed): run `deprojector "
                "gap` again"
            )
        return value

    @classmethod
    def measure(
        cls,
        text_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        bank: torch.Tensor | None = None,
        temperature: float = 0.01,
        bridge: str = "mean-shift",
    ) -> ModalityGap:
        """Fit every bridge on paired [N, P] embeddings; bank: text embeddings [M, P] of
        training captions for `text-projection` (normalised here)."""
        text, image = text_embeds.double(), image_embeds.double()
        x, y = image - image.mean(0), text - text.mean(0)
        gram = x.T @ x
        ridge = RIDGE * gram.trace() / gram.shape[0]
        linear = torch.linalg.solve(
            gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y
        )
        units = torch.nn.functional.normalize(bank.float(), dim=-1) if bank is not None else None
        return cls(
            text_embeds.mean(0),
            image_embeds.mean(0),
            text_embeds.norm(dim=-1).mean().item(),
            linear.float(),
            units,
            temperature,
            bridge,
        )

    def save(self, path: Path) -> None:
        tensors = {
            "mean_text": self.mean_text.float().contiguous(),
            "mean_image": self.mean_image.float().contiguous(),
            "text_norm": torch.tensor([self.text_norm]),
            "temperature": torch.tensor([self.temperature]),
        }
        if self.linear is not None:
            tensors["linear"] = self.linear.float().contiguous()
        if self.bank is not None:  # unit vectors: half precision keeps them to 1e-3
            tensors["bank"] = self.bank.half().contiguous()
        save_tensors(path, tensors, metadata={"bridge": self.bridge})

    @classmethod
    def load(cls, path: str | Path) -> ModalityGap:
        path = Path(path)
        file = path / GAP_FILE if path.is_dir() else path
        if not file.is_file():
            raise ImagePromptError(
                f"{file}: no modality-gap statistics; run `deprojector gap` (the `gap` stage) "
                "for this base.clip, or use no bridge (--bridge none)"
            )
        advice = "run `deprojector gap` again to rewrite it"
        tensors = read_safetensors(file, ImagePromptError, advice)
        missing = {"mean_text", "mean_image", "text_norm"} - set(tensors)
        if missing:
            raise ImagePromptError(f"{file}: missing tensors {sorted(missing)}; {advice}")
        shapes = {k: tuple(v.shape) for k, v in sorted(tensors.items())}
        width = shapes["mean_text"]
        if (
            len(width) != 1
            or shapes["mean_image"] != width
            or tensors["text_norm"].numel() != 1
            or shapes.get("linear", width * 2) != width * 2
            or shapes.get("bank", (1, *width))[1:] != width
        ):
            raise ImagePromptError(
                f"{file}: tensors of shapes {shapes}, expected mean_text "
                f"[P], mean_image [P], text_norm [1], linear [P, P] and "
                f"bank [M, P]; {advice}"
            )
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            bridge = (handle.metadata() or {}).get("bridge", "mean-shift")
        temperature = tensors["temperature"].item() if "temperature" in tensors else 0.01
        bank = tensors["bank"].float() if "bank" in tensors else None
        return cls(
            tensors["mean_text"],
            tensors["mean_image"],
            tensors["text_norm"].item(),
            tensors.get("linear"),
            bank,
            temperature,
            bridge,
        )

    def with_bridge(self, bridge: str) -> ModalityGap:
        """The same statistics with another default bridge."""
        return dataclasses.replace(self, bridge=bridge)


def image_pooled(
    image_embeds: torch.Tensor,
    deprojection: torch.Tensor,
    gap: ModalityGap | None = None,
    bridge: str | None = None,
) -> torch.Tensor:
    """The pooled-space embeddings [N, D] a deprojector reads for images, from the vision
    tower's image_embeds [N, P]: the bridge to text space (`gap.correct`; no `gap`: none),
    then back through the text projection, pooled = bridged @ pinv(W).T, since text_embeds =
    pooled @ W.T (`deprojection` = pinv(W), [D, P], pipeline.data.extraction.compute_constants).
    """
    bridged = image_embeds if gap is None else gap.correct(image_embeds, bridge)
    return bridged.to(deprojection) @ deprojection.T


def saved_gap(model: str | Path) -> ModalityGap | None:
    """The modality-gap statistics training saved in the deprojector folder `model`
    (GAP_FILE), or None when it has none (trained without them, or saved by hand)."""
    file = Path(model) / GAP_FILE
    return ModalityGap.load(file) if file.is_file() else None
