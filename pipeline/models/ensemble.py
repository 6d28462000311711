"""The ensemble: several trained deprojectors generating one sequence together.

At every position each member predicts the next state from the same inputs, the embedding
and the states generated so far, and the ensemble's state is their mean:

    s_i = mean_m f_m(e - null, s_1 - null, ..., s_{i-1} - null)

so each member is fed the average, not its own states (the original study's later
`ensemble`). Teacher-forced, it is the mean of the members' predictions. It has no weights
of its own: its folder's config.json lists the member folders (relative to it, or absolute),
and `save_pretrained` writes a self-contained copy with the members in `members/`.
Generation runs the members' own fast paths (`generation_steps`) in lockstep.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pipeline.core.atomic import write_text
from pipeline.core.hub import copy_companions
from pipeline.models.base import (
    CONFIG_FILE,
    BaseMismatchError,
    Deprojector,
    DeprojectorConfig,
    ModelFileError,
    register_composite,
)

MEMBERS_DIR = "members"  # where save_pretrained puts the members' copies


@dataclass
class EnsembleConfig(DeprojectorConfig):
    # Member folders: relative to the ensemble's folder (e.g. "../vt-rollout") or absolute.
    members: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.members) < 2 or not all(isinstance(m, str) and m for m in self.members):
            raise ValueError(f"members must list 2 or more member folders, got {self.members!r}")


@register_composite
class EnsembleDeprojector(Deprojector):
    model_type = "ensemble"
    config_class = EnsembleConfig
    config: EnsembleConfig

    def __init__(self, config: EnsembleConfig, members: list[Deprojector]) -> None:
        super().__init__(config)
        if len(members) != len(config.members):
            raise ValueError(f"{len(config.members)} member folders, {len(members)} members")
        for member in members:
            mc = member.config
            if (mc.hidden_size, mc.projection_size, mc.num_positions) != (
                config.hidden_size,
                config.projection_size,
                config.num_positions,
            ):
                raise BaseMismatchError(
                    f"ensemble member {member.name_or_path} has D={mc.hidden_size}, "
                    f"P={mc.projection_size}, {mc.num_positions} positions; the ensemble "
                    f"D={config.hidden_size}, P={config.projection_size}, "
                    f"{config.num_positions} positions"
                )
            if (
                mc.base_fingerprint
                and config.base_fingerprint
                and mc.base_fingerprint != config.base_fingerprint
            ):
                raise BaseMismatchError(
                    f"ensemble member {member.name_or_path} was trained on another base CLIP "
                    f"(fingerprint {mc.base_fingerprint[:12]}, the ensemble's "
                    f"{config.base_fingerprint[:12]})"
                )
            if mc.clip_skip != config.clip_skip:
                raise BaseMismatchError(
                    f"ensemble member {member.name_or_path} was trained on clip_skip "
                    f"{mc.clip_skip}, the ensemble on {config.clip_skip}"
                )
        first = members[0]
        for member in members[1:]:
            for name in ("sos", "null", "deprojection"):
                if not torch.allclose(getattr(member, name), getattr(first, name), atol=1e-5):
                    raise BaseMismatchError(
                        f"ensemble members {first.name_or_path} and {member.name_or_path} "
                        f"hold different `{name}` constants: not the same base CLIP"
                    )
        self.members = nn.ModuleList(members)
        self.set_constants(first.sos, first.null, first.deprojection)

    @classmethod
    def of(
        cls, members: list[Deprojector], member_folders: list[str] | None = None
    ) -> EnsembleDeprojector:
        """The ensemble of loaded deprojectors (their config's base and widths are the first
        member's); `member_folders` are what config.json records (default: their paths)."""
        if len(members) < 2:
            raise ValueError(f"an ensemble needs 2 or more members, got {len(members)}")
        c = members[0].config
        config = EnsembleConfig(
            model_type=cls.model_type,
            hidden_size=c.hidden_size,
            projection_size=c.projection_size,
            num_positions=c.num_positions,
            base_clip=c.base_clip,
            base_fingerprint=c.base_fingerprint,
            clip_skip=c.clip_skip,
            members=member_folders or [str(m.name_or_path) for m in members],
        )
        return cls(config, members)

    # --- the math -----------------------------------------------------------------------------

    @property
    def deprojectors(self) -> list[Deprojector]:
        """The members (nn.ModuleList yields them typed as plain modules)."""
        return cast(list[Deprojector], list(self.members))

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        """Mean of the members' teacher-forced predictions: [B,D], [B,T,D] -> [B,T+1,D]."""
        return torch.stack([m.predict(e_rel, prev_rel) for m in self.deprojectors]).mean(dim=0)

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        """The members' own fast paths in lockstep: each yields its next state, the ensemble
        yields their mean, and what it is sent back is sent on to every member."""
        members = [m.generation_steps(e_rel) for m in self.deprojectors]
        s = torch.stack([next(m) for m in members]).mean(dim=0)
        for _ in range(self.config.num_positions - 2):
            fed = yield s
            s = torch.stack([m.send(fed) for m in members]).mean(dim=0)
        yield s

    # --- folders ------------------------------------------------------------------------------

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, companions: bool = True
    ) -> None:
        """config.json plus a copy of every member in members/00-NAME/ (self-contained: what
        push_to_hub uploads); with `companions`, the modality-gap statistics and model card
        of the folder it was loaded from."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, member in enumerate(self.deprojectors):
            names.append(f"{MEMBERS_DIR}/{i:02d}-{Path(str(member.name_or_path)).name}")
            member.save_pretrained(folder / names[-1], companions=False)
        config = {**json.loads(self.to_json_string()), "members": names}
        write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if companions:
            copy_companions(Path(str(self.name_or_path)), folder)

    @classmethod
    def from_folder(
        cls, folder: Path, raw: dict[str, Any], device: str | torch.device = "cpu"
    ) -> EnsembleDeprojector:
        """Load the ensemble whose parsed config.json is `raw`, members from their folders."""
        advice = "write the ensemble again (`deprojector train NAME` for a `models:` entry)"
        # config_from_file builds cls.config_class: an EnsembleConfig.
        config = cast(EnsembleConfig, cls.config_from_file(folder / CONFIG_FILE, raw, advice))
        members = []
        for member in config.members:
            path = folder / member
            if not (path / CONFIG_FILE).is_file():
                raise ModelFileError(
                    f"{folder / CONFIG_FILE}: member {member!r} has no "
                    f"deprojector at {path}; train it first"
                )
            members.append(Deprojector.from_pretrained(path, device=device))
        model = cls(config, members)
        model.name_or_path = str(folder)
        nn.Module.to(model, device)  # in place (ModelMixin's `to` is typed for dtypes only)
        return model.eval()
