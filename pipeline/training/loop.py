"""The `train` stage: teacher-forced training of one deprojector from the shards.

The loss and data are described in docs/architectures.md.

Adam on the position-weighted squared error, batches streamed from the memory-mapped shards
in a per-epoch seeded order, early stopping on the test loss. A checkpoint after every epoch
(model, optimiser, RNG, history) lets an interrupted run continue to the same result.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypedDict, TypeVar

import torch
from tqdm import tqdm

from pipeline.base.files import clip_fingerprint, source_folder
from pipeline.base.loaders import base_source, load_clip
from pipeline.config.params import ModelSpec, Params, TrainParams, validate
from pipeline.core.atomic import atomic_path
from pipeline.core.conventions import BUILTIN
from pipeline.core.errors import DeprojectorError, read_json, read_torch
from pipeline.core.jsonio import write_json
from pipeline.core.sections import ParamsError
from pipeline.data.shards import ShardError, ShardReader, load_constants, read_meta
from pipeline.metrics.cross_attention import Loss, training_loss
from pipeline.metrics.losses import weighted_mse
from pipeline.metrics.unet_loss import UnetLoss
from pipeline.models import Deprojector, DeprojectorConfig, architecture, build_deprojector
from pipeline.models.base import CONFIG_FILE, SAMPLING_KEYWORDS
from pipeline.models.card import CardFacts, write_card
from pipeline.models.ensemble import EnsembleConfig, EnsembleDeprojector
from pipeline.prompting.bridges import GAP_FILE
from pipeline.prompting.bridges import GAP_SUMMARY as SUMMARY_FILE

# The phases of training that train_model reports to its hooks, in the order of a step.
PHASES = ("read", "forward", "loss", "zero_grad", "backward", "optimizer", "evaluate", "checkpoint")


class TrainHooks:
    """What train_model calls around its phases (a benchmark times them:
    pipeline/benchmarks/step_profile.py). This one does nothing: training with it is
    training without hooks (no RNG draws, no arithmetic)."""

    def phase(self, name: str) -> AbstractContextManager[object]:
        """A context around one phase of PHASES: `read` a batch from the shards, a `forward`
        pass, the `loss`, `zero_grad`, `backward`, the `optimizer`'s step, the per-epoch test
        loss (`evaluate`), the `checkpoint` write."""
        return nullcontext()

    def model_built(self, model: Deprojector) -> None:
        """Called once with the fresh model, before training (e.g. to add module hooks)."""


NO_HOOKS = TrainHooks()
Item = TypeVar("Item")


def _each_in_phase(items: Iterable[Item], hooks: TrainHooks, phase: str) -> Iterator[Item]:
    """`items`, each one produced inside hooks.phase(phase) (the last, empty read too)."""
    iterator = iter(items)
    while True:
        with hooks.phase(phase):
            item = next(iterator, None)
        if item is None:
            return
        yield item


class Best(TypedDict):
    """The best epoch so far (by test loss) and its weights (None before the first epoch)."""

    loss: float
    epoch: int
    state: dict[str, torch.Tensor] | None


def model_spec(name: str, params: Params) -> ModelSpec:
    """The `models.NAME` entry of params, or an error listing the names params define."""
    if name not in params.models:
        raise ParamsError(
            f"params: no `models.{name}` (defined: {', '.join(params.models) or 'none'})"
        )
    return params.models[name]


def run_train_params(name: str, params: Params) -> TrainParams:
    """`train:` with this run's own `models.NAME.train` settings over it, validated."""
    t = replace(params.train, **model_spec(name, params).train)
    try:
        validate(replace(params, train=t))
    except ParamsError as err:
        raise ParamsError(f"models.{name}.train: {err}") from err
    return t


def build_model(name: str, params: Params, shards_dir: Path) -> Deprojector:
    """A fresh `models.NAME` deprojector for the shards' base model.

    The architecture takes what it needs from the base CLIP text model through its own
    hooks (shape defaults, initial weights); explicit hyperparameters win.
    """
    spec = model_spec(name, params)
    meta = read_meta(shards_dir)
    if meta["base_clip"] != params.base.clip:
        raise ShardError(
            f"{shards_dir}: extracted with base.clip={meta['base_clip']!r}, but "
            f"params name {params.base.clip!r}; rerun `deprojector extract`"
        )
    if meta.get("clip_skip", 0) != params.extract.clip_skip:
        raise ShardError(
            f"{shards_dir}: extracted with extract.clip_skip={meta.get('clip_skip', 0)}, but "
            f"params name {params.extract.clip_skip}; rerun `deprojector extract`"
        )
    constants = load_constants(shards_dir / "constants.safetensors")
    model_class = architecture(spec.type)
    clip = load_clip(params.base.clip).model if model_class.uses_base_model else None
    try:
        return build_deprojector(
            spec.type,
            meta["hidden_size"],
            meta["projection_size"],
            constants,
            base=clip,
            **spec.hparams,
        )
    except (TypeError, ValueError) as err:
        raise ParamsError(f"params: models.{name} ({spec.type}): {err}") from err


@torch.no_grad()
def evaluate_loss(
    model: Deprojector,
    reader: ShardReader,
    batch_size: int,
    mask_weight: float,
    device: torch.device,
    loss: Loss | None = None,
) -> float:
    """Teacher-forced loss (the weighted states loss, or `loss`: the run's `train.loss`)
    over a whole split (row-weighted mean over batches)."""
    model.eval()
    total = torch.zeros((), device=device)
    for batch in reader.iter_batches(batch_size):
        hidden, mask = batch.hidden.to(device), batch.mask.to(device)
        pred = model(batch.embeds.to(device), hidden)
        error = (
            weighted_mse(pred, hidden, mask, mask_weight)
            if loss is None
            else loss(pred, hidden, mask)
        )
        total += error * len(hidden)
    return total.item() / len(reader)


# The train.loss of the fine-tune through the frozen UNet (pipeline/metrics/unet_loss.py).
UNET = "unet"


@torch.no_grad()
def own_states(model: Deprojector, embeds: torch.Tensor) -> torch.Tensor:
    """[B, 77, D]: the model's free-running generation from embeds [B, D] (in eval mode,
    without gradient): as inputs of a teacher-forced pass, its outputs are the generated
    states, with the gradient truncated at the fed-back inputs as `train.rollout`'s."""
    training = model.training
    model.eval()
    states = model.generate(embeds)
    model.train(training)
    return states


def fed_back(
    model: Deprojector, embeds: torch.Tensor, hidden: torch.Tensor, kind: str, share: float
) -> torch.Tensor:
    """The previous states [B, 77, D] a training step feeds the model: its own generation
    for the `unet` loss (what the UNet reads at sampling); the true states `hidden`, except,
    with scheduled sampling, for a random `share` of the rows (torch's generator), which get
    the model's own generation (the exposure-bias remedy of docs/architectures.md)."""
    if kind == UNET:
        return own_states(model, embeds)
    if share <= 0:
        return hidden
    rows = torch.rand(len(hidden)) < share
    if not rows.any():
        return hidden
    mixed = hidden.to(model.null.dtype).clone()
    mixed[rows.to(hidden.device)] = own_states(model, embeds[rows.to(embeds.device)])
    return mixed


@torch.no_grad()
def evaluate_unet_loss(
    model: Deprojector, reader: ShardReader, loss: UnetLoss, device: torch.device, chunk: int = 20
) -> float:
    """The `unet` loss of the model's generated states over a whole split (row-weighted),
    in chunks of `chunk` rows, each at its own sampler step; the draws come from a generator
    seeded 0, so every evaluation sees the same steps and noise."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for batch in reader.iter_batches(chunk):
        pred = model.generate(batch.embeds.to(device))
        total += loss(pred, batch.hidden.to(device).float(), generator=generator).item() * len(pred)
    return total / len(reader)


def split_loss(
    model: Deprojector,
    reader: ShardReader,
    t: TrainParams,
    kind: str,
    loss: Loss | UnetLoss,
    device: torch.device,
) -> float:
    """The loss early stopping compares, on a whole split: the weighted states loss, or the
    loss `kind` of the phase (`loss`), teacher-forced; the `unet` loss on generated states."""
    if isinstance(loss, UnetLoss):
        return evaluate_unet_loss(model, reader, loss, device)
    forced = None if kind == "states" else loss
    return evaluate_loss(model, reader, t.batch_size, t.mask_weight, device, forced)


def _fingerprint(name: str, params: Params, shards_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the model's params and the data."""
    meta = (shards_dir / "meta.json").read_text()
    blob = json.dumps(
        [name, asdict(params.train), asdict(model_spec(name, params)), meta],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_base(model: Deprojector | DeprojectorConfig, base_clip: str, clip_skip: int = 0) -> None:
    """Write the base CLIP into the model's config: its name (a local folder as an absolute
    path, so the deprojector loads from anywhere), the fingerprint of its files and the
    clip skip of the targets."""
    config = model if isinstance(model, DeprojectorConfig) else model.config
    config.clip_skip = clip_skip
    source = base_source(base_clip, "clip")
    config.base_clip = (
        str(Path(source).resolve()) if base_clip != BUILTIN and Path(source).is_dir() else base_clip
    )
    config.base_fingerprint = clip_fingerprint(source_folder(source, "config.json"))


def record_sampling(config: DeprojectorConfig, params: Params) -> None:
    """Write render.*'s sampling settings (SAMPLING_KEYWORDS) into the config: what `generate`
    and PromptEncoder.sampling_kwargs draw with outside a project (no params.yaml)."""
    config.sampling = {key: getattr(params.render, key) for key in SAMPLING_KEYWORDS}


def write_training_card(
    name: str,
    config: DeprojectorConfig,
    params: Params,
    out_dir: Path,
    budget: tuple[int, int, int, float],
) -> None:
    """models/NAME/README.md: the model card of a run just trained (no evaluation figures
    yet: `deprojector card NAME` adds evaluate's). budget: (rows, epochs, steps, seconds)."""
    rows, epochs, steps, seconds = budget
    facts = CardFacts(
        name=name,
        model_type=config.model_type,
        base_clip=params.base.clip,
        base_sd=params.base.sd,
        rows=rows,
        epochs=epochs,
        steps=steps,
        seconds=seconds,
        captions=params.captions.source,
        sampling=config.sampling,
    )
    write_card(facts, out_dir, f"models/{name}")


def copy_gap(out_dir: Path, gap_dir: Path) -> None:
    """Put gap_dir's modality-gap statistics, when the `gap` stage computed them, into a
    saved deprojector's folder (image prompts read them from there).

    The gap stage writes its summary (modality_gap.json, `computed`) after the statistics and
    deletes it first: statistics without a summary, or a summary saying `computed` without
    them, are the outputs of an interrupted gap stage, refused rather than copied or skipped."""
    (out_dir / GAP_FILE).unlink(missing_ok=True)
    stats, summary_file = gap_dir / GAP_FILE, gap_dir / SUMMARY_FILE
    computed = (
        read_json(summary_file, GapOutputError).get("computed") is True
        if summary_file.exists()
        else None
    )
    if computed is None and stats.exists() or computed and not stats.is_file():
        raise GapOutputError(
            f"{gap_dir}: incomplete outputs of the gap stage ({SUMMARY_FILE} "
            f"{'says computed' if computed else 'missing'}, {GAP_FILE} "
            f"{'missing' if not stats.exists() else 'present'}); rerun `deprojector gap`"
        )
    if computed:
        with atomic_path(out_dir / GAP_FILE) as tmp:
            shutil.copyfile(stats, tmp)


class TrainingDiverged(DeprojectorError):
    """The loss became NaN or infinite: training stops, the last good checkpoint is kept."""


class GapOutputError(DeprojectorError):
    """The gap stage's outputs do not go together (an interrupted stage)."""


def write_ensemble(
    name: str, params: Params, shards_dir: Path, out_dir: Path, plots_dir: Path, gap_dir: Path
) -> list[dict]:
    """An ensemble trains nothing: models/NAME/config.json names its members as the sibling
    folders ../MEMBER (loaded with it, so it always uses their current weights) and records
    the base; its loss curve is empty. Returns the (empty) history."""
    meta = read_meta(shards_dir)
    config = EnsembleConfig(
        model_type=EnsembleDeprojector.model_type,
        hidden_size=meta["hidden_size"],
        projection_size=meta["projection_size"],
        members=[f"../{member}" for member in model_spec(name, params).hparams["members"]],
    )
    record_base(config, params.base.clip, params.extract.clip_skip)
    record_sampling(config, params)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    write_json(out_dir / CONFIG_FILE, config.to_dict())
    copy_gap(out_dir, gap_dir)
    write_training_card(name, config, params, out_dir, (0, 0, 0, 0.0))
    plots_dir.mkdir(parents=True, exist_ok=True)
    write_json(plots_dir / f"{name}.json", [])
    tqdm.write(f"{name}: an ensemble of {', '.join(config.members)}; nothing to train")
    return []


def train_model(
    name: str,
    params: Params,
    shards_dir: Path = Path("data/shards"),
    out_dir: Path | None = None,
    plots_dir: Path = Path("reports/train"),
    checkpoint_dir: Path = Path("data/checkpoints"),
    gap_dir: Path = Path("data/gap"),
    hooks: TrainHooks = NO_HOOKS,
) -> list[dict]:
    """Train `name`, save the best epoch to models/<name>/, return the per-epoch history.

    The saved folder records its base CLIP (`record_base`) and carries a copy of the
    modality-gap statistics of gap_dir, when the `gap` stage computed them, for image prompts.

    Runs as one process, or data-parallel under `torchrun` / `accelerate launch`: each process
    takes its share of every global batch of `train.batch_size` rows, gradients are averaged,
    and only the main process writes checkpoints and outputs. `hooks` are called around each
    phase of training (TrainHooks; the default does nothing).
    """
    from accelerate import Accelerator

    out_dir = out_dir or Path("models") / name
    if model_spec(name, params).type == EnsembleDeprojector.model_type:
        return write_ensemble(name, params, shards_dir, out_dir, plots_dir, gap_dir)
    t = run_train_params(name, params)
    mixed_precision = "no" if t.precision == "fp32" else t.precision
    accelerator = Accelerator(cpu=t.device == "cpu", mixed_precision=mixed_precision)
    device = accelerator.device
    if t.precision == "fp16" and device.type == "cpu":
        log(
            accelerator,
            f"{name}: train.precision fp16 needs a GPU; on the CPU this run "
            "trains in fp32 (bf16 runs on a CPU)",
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(t.seed)
    model = build_model(name, params, shards_dir).to(device)
    hooks.model_built(model)
    train_reader = ShardReader(shards_dir / "train", model.config.hidden_size)
    test_reader = ShardReader(shards_dir / "test", model.config.hidden_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=t.lr)

    checkpoint = checkpoint_dir / f"{name}.pt"
    fingerprint = _fingerprint(name, params, shards_dir)
    history: list[dict] = []
    best = Best(loss=math.inf, state=None, epoch=-1)
    seconds_before = 0.0  # training time of the earlier processes of a resumed run
    if t.resume and checkpoint.exists():
        state = read_checkpoint(checkpoint, device)
        if state is None:
            log(accelerator, f"{name}: {checkpoint} is incomplete or corrupt; starting over")
        elif state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            history, best = state["history"], state["best"]
            seconds_before = float(state.get("seconds", 0.0))  # older checkpoints lack it
            log(accelerator, f"{name}: resuming after epoch {len(history)} from {checkpoint}")
    ddp_model, optimizer = accelerator.prepare(model, optimizer)

    steps = math.ceil(len(train_reader) / t.batch_size)
    started = time.perf_counter()
    # The epochs of train.loss, then those of the fine-tune through the UNet (train.unet_epochs),
    # whose history entries say `"phase": "unet"`.
    phases = [(t.loss, t.epochs)] + ([(UNET, t.unet_epochs)] if t.unet_epochs else [])
    for kind, epochs in phases:
        fine_tune = kind == UNET and t.loss != UNET
        done = sum(1 for h in history if (h.get("phase") == UNET) == fine_tune)
        if not fine_tune and len(history) > done:
            continue  # resumed inside the fine-tune: the first phase is over
        # train.loss: states (the weighted squared error), measured through base.sd's UNet
        # cross-attention keys and values (pipeline/metrics/cross_attention.py), or through
        # its noise prediction (pipeline/metrics/unet_loss.py).
        loss_of = (
            UnetLoss(params.base.sd, params.base.clip, params.render, device)
            if kind == UNET
            else training_loss(
                kind, t.mask_weight, params.base.sd, model.config.hidden_size, device=device
            )
        )

        if fine_tune and not done:
            # From the first phase's best epoch, with a fresh optimiser at train.unet_lr; that
            # epoch's own loss through the UNet is the one to beat.
            assert best["state"] is not None, "the first phase scored an epoch"
            model.load_state_dict(best["state"])
            optimizer.load_state_dict(torch.optim.Adam(trainable, lr=t.unet_lr).state_dict())
            with hooks.phase("evaluate"):
                start = split_loss(model, test_reader, t, kind, loss_of, device)
            best = Best(loss=start, epoch=len(history) - 1, state=best["state"])
            log(accelerator, f"{name}: fine-tune through the UNet from test loss {start:.5f}")
        for epoch in range(len(history), len(history) + epochs - done):
            if t.patience and epoch - best["epoch"] > t.patience:
                log(
                    accelerator,
                    f"{name}: early stop, no better test loss for {t.patience} epochs",
                )
                break
            ddp_model.train()
            running = torch.zeros((), device=device)
            batches = train_reader.iter_batches(
                t.batch_size, shuffle=True, seed=t.seed, epoch=epoch, rank=rank, world=world
            )
            # Scheduled sampling: this epoch's share of rows fed the model's own generation.
            share = t.scheduled_sampling * (epoch + 1) / t.epochs if kind != UNET else 0.0
            for batch in tqdm(
                _each_in_phase(batches, hooks, "read"),
                total=steps,
                desc=f"{name} {'unet ' if fine_tune else ''}epoch {epoch + 1}",
                unit="batch",
                leave=False,
                disable=not accelerator.is_main_process,
            ):
                rows = t.unet_rows if kind == UNET else len(batch.hidden)
                hidden, mask = batch.hidden[:rows].to(device), batch.mask[:rows].to(device)
                embeds = batch.embeds[:rows].to(device)
                with hooks.phase("forward"):
                    pred = ddp_model(embeds, fed_back(model, embeds, hidden, kind, share))
                with hooks.phase("loss"):
                    loss = loss_of(pred.float(), hidden, mask)
                for _ in range(t.rollout if kind != UNET else 0):
                    # Free-running: the model's own predictions as inputs, the gradient
                    # truncated at each pass (docs/architectures.md, training data and loss).
                    with hooks.phase("forward"):
                        pred = ddp_model(embeds, pred.detach())
                    with hooks.phase("loss"):
                        loss = loss + loss_of(pred.float(), hidden, mask)
                loss = loss / (1 + (t.rollout if kind != UNET else 0))
                with hooks.phase("zero_grad"):
                    optimizer.zero_grad(set_to_none=True)
                with hooks.phase("backward"):
                    accelerator.backward(loss)
                with hooks.phase("optimizer"):
                    optimizer.step()
                running += loss.detach()  # summed on the device; read once per epoch
            train_loss = accelerator.reduce(running, reduction="mean").item() / steps
            # Every process scores the whole test split: same numbers, same early stopping.
            with hooks.phase("evaluate"):
                test_loss = split_loss(model, test_reader, t, kind, loss_of, device)
            if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                kept = (
                    f"the checkpoint of epoch {epoch} is kept in {checkpoint}"
                    if epoch and checkpoint.is_file()
                    else "no checkpoint was written"
                )
                raise TrainingDiverged(
                    f"{name}: training diverged at epoch {epoch + 1}: train loss {train_loss}, "
                    f"test loss {test_loss} (train.lr = {t.lr:g}: a smaller learning rate?); "
                    f"stopped, models/{name} left as it was, {kept}"
                )
            entry = {"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss}
            history.append(entry | ({"phase": UNET} if fine_tune else {}))
            if test_loss < best["loss"]:
                best = Best(
                    loss=test_loss,
                    epoch=epoch,
                    state={k: v.detach().clone() for k, v in model.state_dict().items()},
                )
            log(
                accelerator,
                f"{name} {'unet ' if fine_tune else ''}epoch {epoch + 1}: train loss "
                f"{train_loss:.5f}, test loss {test_loss:.5f}"
                f"{' (best)' if best['epoch'] == epoch else ''}",
            )
            if accelerator.is_main_process:
                with hooks.phase("checkpoint"), atomic_path(checkpoint) as tmp:
                    # Serialised in memory and written by Python: a full disk is an OSError
                    # (pipeline/core/atomic.py), not torch's writer's RuntimeError.
                    buffer = io.BytesIO()
                    torch.save(
                        {
                            "fingerprint": fingerprint,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "rng": torch.get_rng_state(),
                            "history": history,
                            "best": best,
                            "seconds": seconds_before + time.perf_counter() - started,
                        },
                        buffer,
                    )
                    tmp.write_bytes(buffer.getbuffer())

    if best["state"] is None:  # no epoch ran (epochs already done) or none was scored
        raise TrainingDiverged(
            f"{name}: no epoch with a finite test loss to save; models/{name} left as it was"
        )
    if accelerator.is_main_process:
        assert best["state"] is not None, "train.epochs >= 1: an epoch was scored"
        model.load_state_dict(best["state"])
        record_base(model, params.base.clip, params.extract.clip_skip)
        record_sampling(model.config, params)
        model.save_pretrained(out_dir, companions=False)
        copy_gap(out_dir, gap_dir)
        budget = (
            len(train_reader),
            len(history),
            steps * len(history),
            seconds_before + time.perf_counter() - started,  # every process's epochs
        )
        write_training_card(name, model.config, params, out_dir, budget)
        plots_dir.mkdir(parents=True, exist_ok=True)
        write_json(plots_dir / f"{name}.json", history)
        checkpoint.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return history


CHECKPOINT_KEYS = ("fingerprint", "model", "optimizer", "rng", "history", "best")


def read_checkpoint(path: Path, device: torch.device | str) -> dict | None:
    """A training checkpoint, or None where the file is cut short or corrupt (the run then
    starts over, as with a checkpoint of other params: it only saves time). Read as data
    (pipeline.core.errors.read_torch): one that needs pickle is refused, naming it; nothing runs."""
    try:
        state = read_torch(path, _CorruptCheckpoint, map_location=device)
    except _CorruptCheckpoint:
        return None
    return state if isinstance(state, dict) and all(k in state for k in CHECKPOINT_KEYS) else None


class _CorruptCheckpoint(Exception):
    pass


def log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        tqdm.write(message)
