"""Training speed and memory: shard streaming overhead, step time vs a plain reference, RSS.

1. Input overhead. One epoch of training steps (vicinity-batch, LayerNorm, batch 100, Adam)
   over ~1000 rows of builtin CLIP hidden states (D = 128) streamed from the memory-mapped
   shards with `ShardReader.iter_batches(shuffle=True)`, divided by the same steps (same
   batches in the same order, same model and optimiser state at start) over tensors already
   in memory. Target: <= 1.10.
2. Training step at real CLIP ViT-L/14 sizes (D = P = 768, random constants and data
   [100, 77, 768], batch 100): forward + weighted_mse + backward + Adam step of our model
   divided by the same math in a plain reference written here without our optimisations
   (explicit causal attention with separate q/k/v instead of SDPA; vicinity windows built by
   a Python loop over the 76 positions, each state projected once per window it is in).
   Our weights are copied into the reference, whose outputs and gradients must match ours
   before timing. Target: <= 1.0 per model. On a 2-core CPU one step at batch 100 takes a
   few seconds (each is ~0.3-0.4 TFLOP); this part dominates the run time.
3. Memory. Peak resident memory not backed by the shard files (RssAnon of /proc/self/status,
   sampled every 10 ms by a thread) during one training epoch over 4N rows / over N rows
   (the N-row shards written 4 times), each in a fresh subprocess, once each: memory does not
   suffer from a busy CPU the way time does. Target: <= 1.2.
4. Step profile (pipeline/benchmarks/step_profile.py). `train_model` itself, every
   architecture at the project's default size (builtin CLIP, D = 128; params.yaml's train
   settings, batch 100; 3,000 training captions, 2 epochs), with timers around its phases:
   the share of a step that is not the model's own arithmetic (forward, backward, Adam) -
   shard reads and float16 -> float32, loss weighting, zero_grad, the per-epoch checkpoint,
   the loop's Python - as `overhead_fraction` per architecture and its breakdown. No target.

Every timed comparison interleaves its variants within each repeat (alternating which goes
first) and reports the median of the per-repeat ratios, since this machine is noisy.

    python -m pipeline.benchmarks.training [--repeats 3] [--threads N] [--json]
    python -m pipeline.benchmarks.training --tiny   # seconds: every item at toy sizes

On a shared 2-core machine, torch's default of 2 threads makes every op wait for the thread
that lost its core to another process: small ops run several times slower and vary more,
which penalises the reference's many small window ops (the run took 6-7 min instead of ~3.5
with --threads 1). --threads 1 gives steadier numbers there. For vicinity-batch, ours and the
reference run the very same matmuls (the windows are data, so nothing flows back through
them); only the window gather differs, so at one thread its ratio sits at ~1.0 +- noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from pipeline.base.loaders import load_clip
from pipeline.benchmarks import step_profile
from pipeline.config.params import parse_params
from pipeline.core.conventions import BUILTIN, MAX_LENGTH
from pipeline.data.extraction import compute_constants, extract_split
from pipeline.data.shards import Batch, ShardReader
from pipeline.metrics.losses import weighted_mse
from pipeline.models import ARCHITECTURES, Deprojector, build_deprojector, hyperparameters
from pipeline.world.scenes import generate_captions

BATCH = 100
# A few seconds on 2 CPU cores (plus two short memory-probe subprocesses): the code paths of
# the real run, not its figures.
TINY = {
    "repeats": 1,
    "captions": 40,
    "step_width": 64,
    "step_batch": 4,
    "profile_captions": 40,
    "profile_test_captions": 8,
    "profile_epochs": 1,
    "profile_batch": 16,
}
LR = 1e-3
MASK_WEIGHT = 25.0
TARGETS = {"input_overhead": 1.10, "step": 1.0, "memory": 1.2}

# Item 1 and 3: the pipeline's vicinity-batch (params.yaml uses LayerNorm) on builtin data.
SMALL_MODEL = ("vicinity-batch", {"vicinity": 3, "norm": "layer"})
# Item 2: CLIP ViT-L/14 text sizes; every registered architecture at its defaults (which are
# CLIP-L's shape), the vicinity models with the article's window and BatchNorm.
D_L = 768
STEP_OVERRIDES = {
    "vicinity-batch": {"vicinity": 3, "norm": "batch"},
    "vicinity-individual": {"vicinity": 3, "norm": "batch"},
}


# --- the training step (as pipeline.training.loop.train_model runs it) --------------------


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    loss_fn: Callable = weighted_mse,
) -> torch.Tensor:
    pred = model(batch.embeds, batch.hidden)
    loss = loss_fn(pred.float(), batch.hidden, batch.mask, MASK_WEIGHT)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)


def random_constants(D: int, P: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sos": torch.randn(D, generator=g),
        "null": torch.randn(D, generator=g),
        "deprojection": torch.randn(D, P, generator=g),
    }


def _interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each timing function once per repeat, alternating the order between repeats."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(fns[name]())
    return times


# --- 1. input overhead --------------------------------------------------------------------


def _build_data(work: Path, captions: int) -> tuple[Path, dict[str, torch.Tensor], int]:
    """The shards of `captions` builtin captions (one split) from the builtin world CLIP
    (models/world/clip, committed; built by `deprojector world`)."""

    # Keep stdout for --json whatever the extraction reports.
    with contextlib.redirect_stdout(sys.stderr):
        clip = load_clip(BUILTIN)
        texts = list(dict.fromkeys(generate_captions(captions * 2, seed=0)))[:captions]
        params = parse_params({"base": {"clip": "builtin"}})
        constants = compute_constants(clip)
        extract_split(clip, texts, work / "shards" / "train", params, 0, constants["null"])
    return work / "shards" / "train", constants, clip.projection_size


def input_overhead(
    split_dir: Path, constants: dict[str, torch.Tensor], projection_size: int, repeats: int
) -> dict:
    reader = ShardReader(split_dir)
    name, hparams = SMALL_MODEL
    torch.manual_seed(0)
    model = build_deprojector(name, reader.hidden_size, projection_size, constants, **hparams)
    model.train()
    start_state = {k: v.clone() for k, v in model.state_dict().items()}

    def streamed() -> Iterable[Batch]:
        return reader.iter_batches(BATCH, shuffle=True, seed=0, epoch=0)

    in_memory = list(streamed())  # the same batches, same order, already materialised
    losses: dict[str, list[float]] = {"streamed": [], "in_memory": []}

    def epoch(kind: str, batches: Callable[[], Iterable[Batch]]) -> Callable[[], float]:
        def timed() -> float:
            model.load_state_dict(start_state)
            optimizer = adam(model)  # fresh: no moments, same as at the start of training
            total = torch.zeros(())
            start = time.perf_counter()
            for batch in batches():
                total += train_step(model, optimizer, batch)
            elapsed = time.perf_counter() - start
            losses[kind].append(total.item())
            return elapsed

        return timed

    fns = {
        "streamed": epoch("streamed", streamed),
        "in_memory": epoch("in_memory", lambda: in_memory),
    }
    for fn in fns.values():
        fn()  # warm-up
    times = _interleaved(fns, repeats)
    # Same work on both sides: the same batches give the same summed loss.
    a, b = losses["streamed"][0], losses["in_memory"][0]
    assert abs(a - b) <= 1e-5 * abs(b), f"streamed and in-memory epochs differ: {a} vs {b}"
    ratios = [s / m for s, m in zip(times["streamed"], times["in_memory"], strict=True)]
    ratio = statistics.median(ratios)
    # The reading alone (no training), a steadier view of what streaming costs per epoch.
    read_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _batch in streamed():
            pass
        read_s.append(time.perf_counter() - start)
    return {
        "model": name,
        "hparams": hparams,
        "rows": len(reader),
        "hidden_size": reader.hidden_size,
        "storage_dtype": str(reader._hidden[0].dtype),
        "batch_size": BATCH,
        "steps_per_epoch": len(in_memory),
        "repeats": repeats,
        "streamed_s_median": statistics.median(times["streamed"]),
        "in_memory_s_median": statistics.median(times["in_memory"]),
        "read_only_s_median": statistics.median(read_s),
        "ratios": ratios,
        "ratio_median": ratio,
        "target": TARGETS["input_overhead"],
        "pass": ratio <= TARGETS["input_overhead"],
    }


# --- 2. plain reference models ------------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def plain_weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mask_weight: float
) -> torch.Tensor:
    weights = torch.where(mask > 0, mask_weight, 1.0)
    weights[:, 0] = 0.0
    weights = weights / weights.mean(dim=1, keepdim=True)
    return (weights[:, :, None] * (pred - target) ** 2).mean()


class PlainTransformer(nn.Module):
    """The original's block written out (docs/architectures.md): separate q/k/v Linear
    modules, explicit causal attention, the position embedding on the attention's input."""

    def __init__(self, D: int, heads: int, intermediate: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.register_buffer("sos", torch.zeros(D))
        self.register_buffer("null", torch.zeros(D))
        self.position_embedding = nn.Parameter(torch.zeros(MAX_LENGTH - 1, D))
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.fc1, self.fc2 = nn.Linear(D, intermediate), nn.Linear(intermediate, D)
        self.ln_final = nn.LayerNorm(D, eps=eps)
        for proj in (self.q_proj, self.k_proj, self.v_proj):  # out_proj is trained
            proj.requires_grad_(False)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        B, _, D = hidden.shape
        T, H = MAX_LENGTH - 1, self.heads
        e = embeds - self.null
        prev = hidden[:, 1:T] - self.null  # s_1 .. s_75
        x = torch.cat([e[:, None], prev], dim=1)
        a = self.ln1(x + self.position_embedding)
        q = self.q_proj(a).view(B, T, H, D // H).transpose(1, 2)
        k = self.k_proj(a).view(B, T, H, D // H).transpose(1, 2)
        v = self.v_proj(a).view(B, T, H, D // H).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * (D // H) ** -0.5
        causal = torch.full((T, T), float("-inf")).triu(1)
        y = torch.softmax(scores + causal, dim=-1) @ v
        h = x + self.out_proj(y.transpose(1, 2).reshape(B, T, D))
        h = h + self.fc2(quick_gelu(self.fc1(self.ln2(h))))
        out = self.ln_final(h)
        return torch.cat([self.sos.expand(B, 1, D), out], dim=1)


class PlainMLPBlock(nn.Module):
    def __init__(self, D: int, ratio: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm = norm(D)
        self.fc1, self.fc2 = nn.Linear(D, ratio * D), nn.Linear(ratio * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(self.norm(x))))


class PlainVicinity(nn.Module):
    """The vicinity models written out (docs/architectures.md): one window per position,
    built in a Python loop."""

    def __init__(
        self,
        individual: bool,
        D: int,
        vicinity: int,
        norm: str,
        mlp_layers: int = 1,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.individual, self.v = individual, vicinity
        norm_class = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm]
        self.register_buffer("sos", torch.zeros(D))
        self.register_buffer("null", torch.zeros(D))
        if individual:
            self.embed_proj, self.state_proj = nn.Linear(D, D), nn.Linear(D, D)
        else:
            self.proj = nn.Linear(D, D)
        self.mix = nn.Linear(D * (1 + vicinity), D)
        self.blocks = nn.ModuleList(
            PlainMLPBlock(D, mlp_ratio, norm_class) for _ in range(mlp_layers)
        )
        self.norm = norm_class(D)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        B, _, D = hidden.shape
        e = embeds - self.null
        s = hidden - self.null
        zero = e.new_zeros(B, D)
        # Position i (1..76): the states s_{i-1} .. s_{i-v}, zeros before s_1.
        windows = torch.stack(
            [
                torch.stack(
                    [s[:, i - k] if i - k >= 1 else zero for k in range(1, self.v + 1)], dim=1
                )
                for i in range(1, MAX_LENGTH)
            ],
            dim=1,
        )  # [B, 76, v, D]
        n = MAX_LENGTH - 1
        if self.individual:
            e_feat = quick_gelu(self.embed_proj(e))
            w_feat = quick_gelu(self.state_proj(windows))  # each state once per window
        else:
            e_feat, w_feat = e, windows
        z = self.mix(torch.cat([e_feat[:, None].expand(B, n, D), w_feat.reshape(B, n, -1)], dim=2))
        x = z if self.individual else self.proj(quick_gelu(z))
        x = x.reshape(B * n, D)
        for block in self.blocks:
            x = block(x)
        out = self.norm(x).view(B, n, D)
        return torch.cat([self.sos.expand(B, 1, D), out], dim=1)


class PlainVicinityTransformer(nn.Module):
    """The vicinity-transformer written out: explicit masked attention per layer, every
    slot's window concat(e, s_{t-1}, ..., s_{t-v}) gathered in a Python loop."""

    def __init__(
        self, D: int, heads: int, intermediate: int, layers: int, v: int, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.heads, self.v = heads, v
        self.register_buffer("sos", torch.zeros(D))
        self.register_buffer("null", torch.zeros(D))
        self.ln_embed = nn.LayerNorm(D, eps=eps)
        self.position_embedding = nn.Parameter(torch.zeros(MAX_LENGTH, D))
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.ln1, layer.ln2, layer.ln_out = (nn.LayerNorm(D, eps=eps) for _ in range(3))
            layer.q_proj, layer.k_proj = nn.Linear(D, D), nn.Linear(D, D)
            layer.v_proj, layer.out_proj = nn.Linear(D, D), nn.Linear(D, D)
            layer.vicinity = nn.Module()
            layer.vicinity.inner = nn.Linear(D * (1 + v), D, bias=False)
            layer.fc1, layer.fc2 = nn.Linear(D, intermediate), nn.Linear(intermediate, D)
            self.layers.append(layer)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        B, _, D = hidden.shape
        T, H = MAX_LENGTH, self.heads
        e = embeds - self.null
        s = hidden - self.null  # s[:, j] = s_j - null
        zero = e.new_zeros(B, D)
        slots = [self.ln_embed(e), zero] + [s[:, j] for j in range(1, T - 1)]
        windows = [
            torch.cat(
                [e] + [s[:, t - k] if t - k >= 1 else zero for k in range(1, self.v + 1)], dim=1
            )
            for t in range(T)
        ]
        x = torch.stack(slots, dim=1) + self.position_embedding
        z = torch.stack(windows, dim=1)
        causal = torch.full((T, T), float("-inf")).triu(1)
        for layer in self.layers:
            a = layer.ln1(x)
            q, k, v = (
                p(a).view(B, T, H, D // H).transpose(1, 2)
                for p in (layer.q_proj, layer.k_proj, layer.v_proj)
            )
            y = torch.softmax(q @ k.transpose(-2, -1) * (D // H) ** -0.5 + causal, dim=-1) @ v
            h = x + layer.out_proj(y.transpose(1, 2).reshape(B, T, D)) + layer.vicinity.inner(z)
            h = h + layer.fc2(quick_gelu(layer.fc1(layer.ln2(h))))
            x = layer.ln_out(h)
        return torch.cat([self.sos.expand(B, 1, D), x[:, 1:]], dim=1)


class PlainLSTM(nn.Module):
    """The LSTM deprojector (one layer, standard cell) as a loop of explicit cell equations."""

    def __init__(self, D: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.register_buffer("sos", torch.zeros(D))
        self.register_buffer("null", torch.zeros(D))
        self.lstm = nn.Module()
        self.lstm.weight_ih_l0 = nn.Parameter(torch.zeros(4 * D, D))
        self.lstm.weight_hh_l0 = nn.Parameter(torch.zeros(4 * D, D))
        self.lstm.bias_ih_l0 = nn.Parameter(torch.zeros(4 * D))
        self.lstm.bias_hh_l0 = nn.Parameter(torch.zeros(4 * D))
        self.ln_final = nn.LayerNorm(D, eps=eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        B, _, D = hidden.shape
        L = self.lstm
        h, c = embeds - self.null, torch.zeros_like(embeds)
        outs = []
        for t in range(1, MAX_LENGTH):
            x = hidden[:, t - 1] - self.null if t >= 2 else torch.zeros_like(h)
            gates = x @ L.weight_ih_l0.T + L.bias_ih_l0 + h @ L.weight_hh_l0.T + L.bias_hh_l0
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(self.ln_final(h + x))
        return torch.cat([self.sos.expand(B, 1, D), torch.stack(outs, dim=1)], dim=1)


def _plain_transformer(c) -> nn.Module:
    assert (c.freeze, c.position) == ("qkv", "attention_input"), "the original's choices"
    return PlainTransformer(c.hidden_size, c.num_heads, c.intermediate_size, c.layer_norm_eps)


def _plain_vicinity_transformer(c) -> nn.Module:
    assert c.vicinity_block == "linear", "the plain reference writes out the linear block"
    return PlainVicinityTransformer(
        c.hidden_size, c.num_heads, c.intermediate_size, c.num_layers, c.vicinity, c.layer_norm_eps
    )


def _plain_lstm(c) -> nn.Module:
    assert (c.cell, c.num_layers, c.embed_linear) == ("standard", 1, False), "the defaults"
    return PlainLSTM(c.hidden_size, c.layer_norm_eps)


# Independent code by definition: an architecture without an entry is reported, not timed.
PLAIN_REFERENCES = {
    "transformer": _plain_transformer,
    "vicinity-batch": lambda c: PlainVicinity(
        False, c.hidden_size, c.vicinity, c.norm, c.mlp_layers, c.mlp_ratio
    ),
    "vicinity-individual": lambda c: PlainVicinity(
        True, c.hidden_size, c.vicinity, c.norm, c.mlp_layers, c.mlp_ratio
    ),
    "vicinity-transformer": _plain_vicinity_transformer,
    "lstm": _plain_lstm,
}


def plain_reference(name: str, ours: Deprojector) -> nn.Module:
    ref = PLAIN_REFERENCES[name](ours.config)
    theirs = ours.state_dict()
    with torch.no_grad():
        for key, value in ref.state_dict().items():
            value.copy_(theirs[key])  # KeyError if the reference has a tensor ours lacks
    return ref


def random_batch(batch: int, D: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, MAX_LENGTH + 1, (batch, 1), generator=g)  # BOS..EOS
    mask = (torch.arange(MAX_LENGTH)[None] < lengths).float()
    return Batch(
        torch.randn(batch, D, generator=g), torch.randn(batch, MAX_LENGTH, D, generator=g), mask
    )


def _grad_rel_diff(ours: nn.Module, ref: nn.Module) -> float:
    """Worst relative gradient difference over the parameters. A gradient that is zero in
    exact arithmetic (a key bias: softmax ignores a constant added to every score) is
    rounding noise on both sides, so each is measured against at least 1e-4 of the largest."""
    refs = dict(ref.named_parameters())
    floor = 1e-4 * max(g.grad.norm() for g in refs.values() if g.grad is not None)
    worst = 0.0
    for key, p in ours.named_parameters():
        if p.grad is None:
            assert refs[key].grad is None, f"{key}: reference has a gradient, ours none"
            continue
        g = refs[key].grad
        worst = max(worst, ((p.grad - g).norm() / torch.maximum(g.norm(), floor)).item())
    return worst


def _step_one(
    name: str, hparams: dict, batch: Batch, constants: dict[str, torch.Tensor], repeats: int
) -> dict:
    """Ours vs the plain reference for one model (its tensors are freed on return)."""
    torch.manual_seed(0)
    D = batch.embeds.shape[1]
    ours = build_deprojector(name, D, D, constants, **hparams).train()
    with torch.no_grad():  # zero-started weights (vicinity blocks) as after some training
        for p in ours.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    ref = plain_reference(name, ours).train()
    opt_ours, opt_ref = adam(ours), adam(ref)
    assert len(opt_ours.param_groups[0]["params"]) == len(opt_ref.param_groups[0]["params"])
    # Check (and warm-up): same outputs, losses and gradients, before any weight update.
    pred_ours, pred_ref = ours(batch.embeds, batch.hidden), ref(batch.embeds, batch.hidden)
    out_diff = (pred_ours - pred_ref).abs().max().item()
    assert out_diff <= 1e-4, f"{name}: plain reference differs from ours by {out_diff:.2e}"
    weighted_mse(pred_ours, batch.hidden, batch.mask, MASK_WEIGHT).backward()
    plain_weighted_mse(pred_ref, batch.hidden, batch.mask, MASK_WEIGHT).backward()
    grad_diff = _grad_rel_diff(ours, ref)
    assert grad_diff <= 1e-3, f"{name}: gradients differ (relative {grad_diff:.2e})"
    opt_ours.step(), opt_ref.step()
    del pred_ours, pred_ref

    def timed(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable) -> float:
        start = time.perf_counter()
        train_step(model, opt, batch, loss_fn)
        return time.perf_counter() - start

    times = _interleaved(
        {
            "ours": lambda: timed(ours, opt_ours, weighted_mse),
            "reference": lambda: timed(ref, opt_ref, plain_weighted_mse),
        },
        repeats,
    )
    ratios = [o / r for o, r in zip(times["ours"], times["reference"], strict=True)]
    ratio = statistics.median(ratios)
    return {
        "hparams": hparams,
        "ours_s_median": statistics.median(times["ours"]),
        "reference_s_median": statistics.median(times["reference"]),
        "ratios": ratios,
        "ratio_median": ratio,
        "max_abs_output_diff": out_diff,
        "max_grad_rel_diff": grad_diff,
        "target": TARGETS["step"],
        "pass": ratio <= TARGETS["step"],
    }


def step_hparams(name: str, width: int) -> dict:
    """STEP_OVERRIDES; below CLIP-L's width also heads (one per 64) and MLP width (4 D)."""
    hparams = dict(STEP_OVERRIDES.get(name, {}))
    if width != D_L and "num_heads" in hyperparameters(name):
        hparams.update(num_heads=max(1, width // 64), intermediate_size=4 * width)
    return hparams


def step_vs_reference(repeats: int, width: int = D_L, batch_size: int = BATCH) -> dict:
    batch = random_batch(batch_size, width)
    constants = random_constants(width, width)
    models = {
        name: _step_one(name, step_hparams(name, width), batch, constants, repeats)
        for name in ARCHITECTURES
        if name in PLAIN_REFERENCES
    }
    return {
        "batch_size": batch_size,
        "hidden_size": width,
        "projection_size": width,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "models": models,
        "no_plain_reference": [n for n in ARCHITECTURES if n not in PLAIN_REFERENCES],
        "pass": all(m["pass"] for m in models.values()),
    }


# --- 3. memory ----------------------------------------------------------------------------


def rss_anon_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """Peak RssAnon of this process, sampled every `interval` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, rss_anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon_kib())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def memory_probe(split_dir: Path) -> dict:
    """One training epoch over `split_dir` (run in a fresh process): peak RssAnon in KiB."""
    name, hparams = SMALL_MODEL
    torch.manual_seed(0)
    baseline = rss_anon_kib()
    with PeakSampler() as sampler:
        reader = ShardReader(split_dir)
        D = reader.hidden_size
        model = build_deprojector(name, D, D, random_constants(D, D), **hparams).train()
        optimizer = adam(model)
        steps = 0
        for batch in reader.iter_batches(BATCH, shuffle=True, seed=0, epoch=0):
            train_step(model, optimizer, batch)
            sampler.sample()
            steps += 1
    return {"rows": len(reader), "steps": steps, "baseline_kib": baseline, "peak_kib": sampler.peak}


def _probe_subprocess(split_dir: Path) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.benchmarks.training",
            "--memory-probe",
            str(split_dir),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"memory probe of {split_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(split_dir: Path, work: Path, repeats: int) -> dict:
    """Peaks over N rows and over the same shards written 4 times (4N rows)."""
    big = work / "shards-4x"
    big.mkdir(parents=True, exist_ok=True)
    shards = sorted(split_dir.glob("shard-*.arrow"))
    for copy in range(4):
        for k, path in enumerate(shards):
            shutil.copyfile(path, big / f"shard-{copy * len(shards) + k:05d}.arrow")
    runs = _interleaved(
        {"n": lambda: _probe_subprocess(split_dir), "4n": lambda: _probe_subprocess(big)}, repeats
    )
    ratios = [b["peak_kib"] / a["peak_kib"] for a, b in zip(runs["n"], runs["4n"], strict=True)]
    ratio = statistics.median(ratios)
    mib = 1 / 1024

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind]) * mib

    return {
        "model": SMALL_MODEL[0],
        "rows_n": runs["n"][0]["rows"],
        "rows_4n": runs["4n"][0]["rows"],
        "repeats": repeats,
        "peak_n_mib": median("n", "peak_kib"),
        "peak_4n_mib": median("4n", "peak_kib"),
        # Growth above the process's RssAnon before the reader was opened (imports, torch).
        "growth_n_mib": statistics.median(
            (r["peak_kib"] - r["baseline_kib"]) * mib for r in runs["n"]
        ),
        "growth_4n_mib": statistics.median(
            (r["peak_kib"] - r["baseline_kib"]) * mib for r in runs["4n"]
        ),
        "ratios": ratios,
        "ratio_median": ratio,
        "target": TARGETS["memory"],
        "pass": ratio <= TARGETS["memory"],
    }


# --- all ----------------------------------------------------------------------------------


def run(
    repeats: int = 3,
    captions: int = 1000,
    step_width: int = D_L,
    step_batch: int = BATCH,
    profile_captions: int = 3000,
    profile_test_captions: int = 200,
    profile_epochs: int = 2,
    profile_batch: int = BATCH,
) -> dict:
    """Items 1-4. `captions` is N of items 1 and 3; `step_*` shrink item 2 below CLIP-L's
    sizes and `profile_*` item 4 below the project's defaults, for quick checks only."""

    start = time.perf_counter()
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        split_dir, constants, projection_size = _build_data(work, captions)
        data_s = time.perf_counter() - start
        # Small-model epochs are cheap next to item 2's steps: more rounds for a steadier median.
        result = {
            "input_overhead": input_overhead(split_dir, constants, projection_size, 2 * repeats + 1)
        }
        result["memory"] = memory(split_dir, work, repeats=1)
        result["step"] = step_vs_reference(repeats, step_width, step_batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["profile"] = step_profile.run(
        profile_captions, profile_test_captions, profile_epochs, profile_batch
    )
    result["all_pass"] = all(result[k]["pass"] for k in ("input_overhead", "step", "memory"))
    result["threads"] = threads
    result["data_build_s"] = data_s
    result["wall_s"] = time.perf_counter() - start
    return result


def _verdict(passed: bool, target: float) -> str:
    return "ok" if passed else f"MISSED (target <= {target})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--captions", type=int, default=1000, help="N, the rows of items 1, 3")
    parser.add_argument(
        "--profile-captions",
        type=int,
        default=3000,
        help="training captions of item 4 (params.yaml: 3000)",
    )
    parser.add_argument("--profile-epochs", type=int, default=2, help="epochs of item 4")
    parser.add_argument(
        "--tiny", action="store_true", help=f"smoke-test sizes ({TINY}); overrides the sizes above"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory-probe", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(Path(args.memory_probe))))
        return
    result = (
        run(**TINY)
        if args.tiny
        else run(
            args.repeats,
            args.captions,
            profile_captions=args.profile_captions,
            profile_epochs=args.profile_epochs,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_report(result)


def print_report(result: dict) -> None:
    """The text report of `run`'s result."""
    i, m = result["input_overhead"], result["memory"]
    print(
        f"input overhead  streamed {i['streamed_s_median']:.3f} s / in-memory "
        f"{i['in_memory_s_median']:.3f} s per epoch ({i['rows']} rows, D={i['hidden_size']}, "
        f"batch {i['batch_size']}): ratio {i['ratio_median']:.3f}  "
        f"{_verdict(i['pass'], i['target'])}  (reading alone {i['read_only_s_median']:.3f} s)"
    )
    s = result["step"]
    for name, entry in s["models"].items():
        print(
            f"step {name:<20} ours {entry['ours_s_median']:.2f} s / plain reference "
            f"{entry['reference_s_median']:.2f} s (D={s['hidden_size']}, batch "
            f"{s['batch_size']}): ratio {entry['ratio_median']:.3f}  "
            f"{_verdict(entry['pass'], entry['target'])}"
        )
    print(
        f"memory          peak RssAnon {m['rows_4n']} rows {m['peak_4n_mib']:.1f} MiB / "
        f"{m['rows_n']} rows {m['peak_n_mib']:.1f} MiB (growth in epoch "
        f"{m['growth_4n_mib']:.1f} / {m['growth_n_mib']:.1f} MiB): ratio "
        f"{m['ratio_median']:.3f}  {_verdict(m['pass'], m['target'])}"
    )
    p = result["profile"]
    for name, entry in p["models"].items():
        f = entry["fractions"]
        print(
            f"profile {name:<20} step {entry['step_s'] * 1e3:.1f} ms (D={p['hidden_size']}, "
            f"batch {p['batch_size']}): overhead {entry['overhead_fraction']:.1%} = read "
            f"{f['read']:.1%} + loss {f['loss']:.1%} + zero_grad {f['zero_grad']:.1%} + "
            f"checkpoint {f['checkpoint']:.1%} + other {f['other']:.1%}"
        )
    print(
        f"total {result['wall_s']:.0f} s (data build {result['data_build_s']:.0f} s, "
        f"{result['threads']} threads), "
        f"{'all targets met' if result['all_pass'] else 'some targets MISSED'}"
    )


if __name__ == "__main__":
    main()
