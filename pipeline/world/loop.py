"""The training loop every part of the world shares: seeded per step, checkpointed, resumable.

Each step draws its randomness from generators seeded by (seed, step), never from global
state, so a run killed and resumed from its last checkpoint ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.world.checkpoints import read_checkpoint, save_atomic

CHECKPOINT_EVERY = 250  # steps


def step_generators(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """A numpy and a torch generator for one step, independent of every other step."""
    return (
        np.random.default_rng([seed, step]),
        torch.Generator().manual_seed(seed * 1_000_003 + step),
    )


def cosine_lr(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_steps(
    name: str,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    steps: int,
    lr: float,
    step_fn: Callable[[int], torch.Tensor],
    checkpoint: Path,
    warmup: int = 100,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Run `step_fn(step) -> loss` for steps 0..steps-1 with Adam-style `optimizer`.

    `modules` are saved in the checkpoint with the optimizer and the loss history; a
    checkpoint left by an interrupted run is resumed from. Returns the loss of every step.
    """
    start, losses = 0, []
    state = read_checkpoint(checkpoint) if checkpoint.exists() else None
    if checkpoint.exists() and state is None:
        tqdm.write(f"{name}: {checkpoint} is incomplete or corrupt; starting over")
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
        tqdm.write(f"{name}: resuming at step {start} from {checkpoint}")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, min(warmup, steps // 10 + 1))
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
            save_atomic(
                {
                    "modules": {k: m.state_dict() for k, m in modules.items()},
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                    "losses": losses,
                },
                checkpoint,
            )
    checkpoint.unlink(missing_ok=True)
    return losses
