"""Does a deprojector that commits to tokens draw better? A one-pass token decoder.

The deprojectors regress 76 states; where the embedding leaves something uncertain they
average the plausible answers, and the UNet draws the average. `embedding_probe` showed that
a probe which *classifies* the world's facts from the same embedding, its answer rewritten as
a prompt and encoded by CLIP, draws at 0.95-0.96 of the reference. This experiment does the
same with no knowledge of the world: the embedding is decoded into CLIP *tokens*, and CLIP's
own text encoder turns them into states (vec2text-style inversion, in one pass):

    x = body(e - null)                   [76, D]: the architecture of params.yaml's `queries`
                                         run (learned queries reading tokens of e - null),
                                         started as that run is
    logits_j = W x_j + b                 [V']: over the tokens the training targets use
    loss = cross-entropy at positions 1..n-1 (the caption's tokens and EOS)
    decode: argmax at each position up to the first EOS -> a prompt -> CLIP's states

It trains on the deprojectors' own training rows (data/shards/train: every kind, their
targets' texts tokenised), with `train:`'s batch size, learning rate and epochs, so it sees
what `queries` sees for as many steps. It is judged as evaluate judges the runs, beside
models/queries (trained by the pipeline) and, on comma prompts, blend:

- states: masked cosine of the decoded prompt's CLIP states on the test caption rows and on
  the test image rows, paired row by row against `queries`' generated states;
- combination: the held-out pairs "A, B" (evaluate's), Σ(e_k − null) + null decoded, against
  H("A B"), beside `queries` and blend;
- pictures: evaluate's held-out prompts and seeds, rows reference, `queries`, `tokens` (and
  `blend` on comma prompts), ratio to the reference, and `tokens` paired against `queries`
  and blend, prompt by prompt.

With `--candidates N` each embedding is decoded N times (greedy, then sampled at temperature
1) and the prompt whose own CLIP embedding is closest to the input is kept: a re-embedding
check, as vec2text corrects its hypotheses against the target embedding. A comma prompt's
input is Σ(e_k − null) + null, which no single prompt's embedding reproduces; `--rank parts`
compares each candidate cut into up to 3 parts, its parts' offsets summed, the best cut.

    python -m pipeline.experiments.token_decoder --epochs 24 --out docs/records/token_decoder.json
    python -m pipeline.experiments.token_decoder --candidates 8 --epochs 24
    python -m pipeline.experiments.token_decoder --candidates 8 --rank parts --epochs 24
    python -m pipeline.experiments.token_decoder --tiny   # seconds: the code path only

Needs a `dvc repro`ed project (data/shards, models/queries). A real CLIP's vocabulary is
49,408 tokens: the head covers only the tokens the training targets use, so the decoder
cannot say a word its captions never said.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.base.clip_encode import encode_texts, encode_tokens, token_ids, tokenize
from pipeline.base.loaders import ClipText, load_clip
from pipeline.config.params import Params, load_params
from pipeline.core.conventions import MAX_LENGTH, combine_embeddings
from pipeline.core.jsonio import write_json
from pipeline.core.names import BLEND
from pipeline.data.shards import ShardReader, read_meta
from pipeline.experiments.embedding_probe import embeddings
from pipeline.metrics.adherence import (
    ADHERENCE,
    REFERENCE,
    Scorer,
    column,
    evaluate_adherence,
    judged_rows,
    prompt_seeds,
)
from pipeline.metrics.intervals import (
    mean_with_ci,
    paired_difference,
    ratio_of_sums,
    ratio_with_ci,
)
from pipeline.metrics.losses import cosine_per_position, masked_cosine_terms
from pipeline.metrics.records import ALL_PARTS, COSINE_MASKED
from pipeline.metrics.scores import combination_pairs, score_answers
from pipeline.models import Deprojector
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import load_pipeline
from pipeline.training.loop import build_model
from pipeline.world.embedded import World

TOKENS = "tokens"
BASELINE = "queries"  # the run the decoder shares its body with, and is paired against
SEED = 0  # the bootstrap's
IGNORE = -100  # cross-entropy's ignored target
TINY = {"epochs": 1, "prompts": 4, "rows": 200}
RANKS = ("whole", "parts")  # how --candidates are compared with the input (decoded_prompts)
MAX_PARTS = 3  # a candidate read as at most this many comma parts (rank "parts")
ENCODE_BATCH = 1024  # texts per CLIP forward when ranking by parts


class OnePassDecoder(nn.Module):
    """e [B, D] -> logits [B, 76, V'] at positions 1..76 at once: the `queries` body and a
    linear head over `vocab` (CLIP token ids [V'])."""

    def __init__(self, body: Deprojector, vocab: torch.Tensor, eos: int) -> None:
        super().__init__()
        self.body = body
        self.eos = eos
        self.register_buffer("vocab", vocab)
        self.head = nn.Linear(body.config.hidden_size, len(vocab))

    @property
    def null(self) -> torch.Tensor:
        return self.body.null

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        states = self.body.generate_states(embeds - self.null)  # [B, 76, D]
        return self.head(states)

    def loss(self, embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at positions 1..76 of targets [B, 77] (indices into vocab)."""
        return cross_entropy(self(embeds), targets[:, 1:])

    @torch.no_grad()
    def decode(
        self,
        embeds: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Each row's token ids up to its first EOS (BOS and EOS not included): the argmax at
        each position, or with temperature > 0 a sample of each position's softmax."""
        choice = pick(self(embeds), temperature, generator)
        return cut_at_eos(self.vocab[choice], self.eos)


class CaptionDecoder(nn.Module):
    """ClipCap-style autoregressive decoding: K prefix vectors made from e - null, then a
    causal transformer over the caption's tokens, each predicting the next:

        p = reshape(W_p (e - null) + b_p, [K, D])
        x = [p; E[BOS], E[t_1], ..., E[t_{T-1}]] + pos            [K + T, D]
        h = causal_transformer(x)                                  pre-LN, L layers
        logits_j = W_o LN(h_{K+j})                                 next token after t_j

    Greedy decoding: the argmax token appended until EOS (or 75 tokens)."""

    def __init__(
        self,
        null: torch.Tensor,
        vocab: torch.Tensor,
        bos: int,
        eos: int,
        prefix: int = 8,
        layers: int = 2,
    ) -> None:
        super().__init__()
        D = null.shape[0]
        self.bos, self.eos = bos, eos
        self.register_buffer("null", null.clone())
        self.register_buffer("vocab", vocab)
        self.K = prefix
        self.prefix = nn.Linear(D, prefix * D)
        self.embed = nn.Embedding(len(vocab), D)
        self.pos = nn.Parameter(torch.randn(prefix + MAX_LENGTH, D) * 0.02)
        block = nn.TransformerEncoderLayer(
            D,
            max(1, D // 32),
            4 * D,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, len(vocab))

    def forward(self, embeds: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """embeds [B, D], inputs [B, T] (indices into vocab, BOS first) -> logits [B, T, V']."""
        B, T = inputs.shape
        p = self.prefix(embeds - self.null).view(B, self.K, -1)
        x = torch.cat([p, self.embed(inputs)], dim=1) + self.pos[: self.K + T]
        causal = nn.Transformer.generate_square_subsequent_mask(self.K + T)
        h = self.blocks(x, mask=causal, is_causal=True)
        return self.head(self.ln(h[:, self.K :]))

    def loss(self, embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of each next token of targets [B, 77]."""
        inputs = targets[:, :-1].clamp(min=0)  # after EOS: any token, its targets are ignored
        return cross_entropy(self(embeds, inputs), targets[:, 1:])

    @torch.no_grad()
    def decode(
        self,
        embeds: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Each row decoded up to EOS (BOS and EOS not included): greedy, or with
        temperature > 0 each next token sampled from its softmax."""
        index = {int(t): k for k, t in enumerate(self.vocab)}
        seq = torch.full((len(embeds), 1), index[self.bos])
        finished = torch.zeros(len(embeds), dtype=torch.bool)
        for _ in range(MAX_LENGTH - 2):
            step = pick(self(embeds, seq)[:, -1], temperature, generator)
            seq = torch.cat([seq, step[:, None]], dim=1)
            finished |= step == index[self.eos]
            if finished.all():
                break
        return cut_at_eos(self.vocab[seq[:, 1:]], self.eos)


def pick(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Indices [...] from logits [..., V']: the argmax, or a sample of softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.reshape(probs.shape[:-1])


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V'] against targets [B, T] (IGNORE: skipped)."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def cut_at_eos(ids: torch.Tensor, eos: int) -> list[list[int]]:
    """Rows of token ids [B, T], each up to its first EOS (at most 75 tokens)."""
    out = []
    for row in ids.tolist():
        out.append(row[: row.index(eos)] if eos in row else row[: MAX_LENGTH - 2])
    return out


def token_targets(clip: ClipText, texts: list[str]) -> torch.Tensor:
    """[N, 77] CLIP token ids: BOS, the tokens, EOS, then IGNORE (CLIP's truncation)."""
    targets = torch.full((len(texts), MAX_LENGTH), IGNORE, dtype=torch.long)
    eos = clip.tokenizer.eos_token_id
    for row, ids in enumerate(token_ids(clip, texts)):
        ids = ids[: MAX_LENGTH - 1] + [eos] if len(ids) > MAX_LENGTH else ids
        targets[row, : len(ids)] = torch.tensor(ids)
    return targets


def split_texts(reader: ShardReader) -> list[str]:
    """Every row's target text, in row order."""
    return [t for table in reader.tables for t in table.column("target_text").to_pylist()]


Decoder = OnePassDecoder | CaptionDecoder
Decode = Callable[[torch.Tensor], list[str]]  # embeddings [N, D] -> their decoded prompts
DECODERS = ("autoregressive", "one-pass")


def train_decoder(
    kind: str,
    params: Params,
    shards: Path,
    clip: ClipText,
    epochs: int,
    rows: int | None = None,
) -> tuple[Decoder, list[dict], float]:
    """The decoder of `kind` (DECODERS) trained on the training rows (the first `rows` of
    them, or all), at its epoch of lowest test cross-entropy (early stopping after
    `train.patience` epochs without a lower one, as `train` does); its history (per epoch:
    train and test cross-entropy) and training seconds."""
    t = params.train
    torch.manual_seed(t.seed)
    # Built for both decoders: its initialisation draws from the seeded generator before the
    # decoder's, so the autoregressive decoder's weights (and the records) follow from it.
    body = build_model(BASELINE, params, shards)
    train = ShardReader(shards / "train", body.config.hidden_size)
    test = ShardReader(shards / "test", body.config.hidden_size)
    train_rows = np.arange(len(train) if rows is None else min(rows, len(train)))
    test_rows = torch.from_numpy(test.rows_of(image=False))
    train_ids = token_targets(clip, split_texts(train))
    test_ids = token_targets(clip, split_texts(test))
    vocab = torch.unique(train_ids[train_ids != IGNORE])
    lookup = torch.full((max(int(vocab.max()), int(test_ids.max())) + 1,), IGNORE)
    lookup[vocab] = torch.arange(len(vocab))

    def indices(ids: torch.Tensor) -> torch.Tensor:  # token ids -> indices into vocab
        return torch.where(ids == IGNORE, IGNORE, lookup[ids.clamp(min=0)])

    train_targets, test_targets = indices(train_ids), indices(test_ids)
    bos, eos = clip.tokenizer.bos_token_id, clip.tokenizer.eos_token_id
    decoder: Decoder = (
        OnePassDecoder(body, vocab, eos)
        if kind == "one-pass"
        else CaptionDecoder(body.null, vocab, bos, eos)
    )
    optimizer = torch.optim.Adam(decoder.parameters(), lr=t.lr)
    embeds, test_embeds = train.embeddings(), test.embeddings()
    history: list[dict] = []
    best: tuple[float, dict] = (float("inf"), {})
    begin = time.perf_counter()
    for epoch in range(epochs):
        decoder.train()
        order = train_rows[np.random.default_rng([t.seed, epoch]).permutation(len(train_rows))]
        losses = []
        for start in tqdm(range(0, len(order), t.batch_size), desc=f"tokens epoch {epoch + 1}"):
            batch = torch.from_numpy(order[start : start + t.batch_size])
            loss = decoder.loss(embeds[batch], train_targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        decoder.eval()
        with torch.no_grad():
            test_loss = decoder.loss(test_embeds[test_rows], test_targets[test_rows]).item()
        history.append(
            {"epoch": epoch + 1, "train_ce": float(np.mean(losses)), "test_ce": test_loss}
        )
        print(json.dumps(history[-1]))
        if test_loss < best[0]:
            best = (test_loss, copy.deepcopy(decoder.state_dict()))
        elif (
            t.patience
            and epoch + 1 - min(history, key=lambda h: h["test_ce"])["epoch"] >= t.patience
        ):
            break
    decoder.load_state_dict(best[1])
    return decoder, history, time.perf_counter() - begin


def splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut `text`'s words into 1..parts contiguous parts (each part's words
    joined); the text itself if it has no words."""
    words = text.split()
    out = []
    for k in range(1, min(parts, len(words)) + 1):
        for cuts in itertools.combinations(range(1, len(words)), k - 1):
            bounds = (0, *cuts, len(words))
            out.append([" ".join(words[a:b]) for a, b in itertools.pairwise(bounds)])
    return out or [[text]]


def parts_closeness(
    clip: ClipText, texts: list[str], embeds: torch.Tensor, null: torch.Tensor
) -> torch.Tensor:
    """[N]: for text i, the largest cos(Σ_k (e(part_k) − null), e_i − null) over its cuts
    into at most MAX_PARTS parts (the whole text among them): how well it reads as the parts
    whose combined embedding Σ(e_k − null) + null the input may be."""
    cuts = [splits(t, MAX_PARTS) for t in texts]
    unique = sorted({part for c in cuts for cut in c for part in cut}, key=lambda p: (len(p), p))
    index = {part: i for i, part in enumerate(unique)}
    pooled = []
    for i in range(0, len(unique), ENCODE_BATCH):
        # The pooled embedding is read at EOS under a causal mask: the padding after the
        # longest text of a batch changes nothing, so it is cut (the parts are short).
        tokens = tokenize(clip, unique[i : i + ENCODE_BATCH])
        length = int(tokens["attention_mask"].sum(dim=1).max())
        ids, mask = tokens["input_ids"][:, :length], tokens["attention_mask"][:, :length]
        pooled.append(encode_tokens(clip, ids, mask).pooled.float())
    offsets = torch.cat(pooled) - null  # [U, D]
    best = []
    for row, c in enumerate(cuts):
        sums = torch.stack([offsets[[index[part] for part in cut]].sum(dim=0) for cut in c])
        best.append(nn.functional.cosine_similarity(sums, embeds[row] - null, dim=-1).max())
    return torch.stack(best)


def decoded_prompts(
    decoder: Decoder,
    clip: ClipText,
    embeds: torch.Tensor,
    candidates: int = 1,
    rank: str = "whole",
) -> list[str]:
    """The prompt each embedding e [N, D] decodes to. With candidates > 1: the greedy prompt
    and candidates − 1 sampled ones (temperature 1, seeded), and of them the one whose own
    CLIP embedding is closest to e: the largest cos(e(prompt) − null, e − null) (a
    re-embedding check, as vec2text's correction step compares); `rank` "parts": the
    largest `parts_closeness`, the prompt read as up to MAX_PARTS comma parts."""
    embeds = embeds.float()
    generator = torch.Generator().manual_seed(SEED)
    rounds = [decoder.decode(embeds)] + [
        decoder.decode(embeds, 1.0, generator) for _ in range(candidates - 1)
    ]
    texts = [clip.tokenizer.batch_decode(ids, skip_special_tokens=True) for ids in rounds]
    if candidates == 1:
        return texts[0]
    null = decoder.null
    if rank == "parts":  # every candidate at once: their parts overlap, each is encoded once
        flat = [text for t in texts for text in t]
        closeness = parts_closeness(clip, flat, embeds.repeat(candidates, 1), null)
        closeness = closeness.view(candidates, len(embeds))
    else:
        offsets = torch.stack(
            [encode_texts(clip, t).pooled.float() - null for t in texts]
        )  # [candidates, N, D]
        closeness = nn.functional.cosine_similarity(offsets, (embeds - null)[None], dim=-1)
    best = closeness.argmax(dim=0).tolist()  # [N]: the candidate kept
    return [texts[c][row] for row, c in enumerate(best)]


def answer_of(
    decode: Decode, clip: ClipText, said: list[str] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """embeds [B, D] -> the CLIP states [B, 77, D] of the prompts they decode to (appended to
    `said`, when given, in call order)."""

    def answer(embeds: torch.Tensor) -> torch.Tensor:
        prompts = decode(embeds)
        if said is not None:
            said.extend(prompts)
        return encode_texts(clip, prompts).hidden.float()

    return answer


def states_scores(
    decode: Decode, queries: Deprojector, clip: ClipText, shards: Path, params: Params
) -> dict:
    """Masked cosine on the test caption rows and image rows: the decoded prompts' states,
    `queries`' generated states, and their paired difference; exact decodes of the target."""
    test = ShardReader(shards / "test", queries.config.hidden_size)
    out: dict = {}
    for split, image in (("captions", False), ("image_rows", True)):
        rows = test.rows_of(image=image)
        if not len(rows):
            continue
        args = (test, params.evaluate.batch_size, params.train.mask_weight, rows)
        decoded: list[str] = []  # the prompts scored, in the rows' order
        mine = score_answers(answer_of(decode, clip, decoded), *args)
        theirs = score_answers(queries.generate, *args)
        texts = split_texts(test)
        exact = [d == texts[r] for d, r in zip(decoded, rows, strict=True)]
        summary = mine.result(SEED)
        out[split] = {
            "rows": len(rows),
            TOKENS: summary[COSINE_MASKED],
            f"{TOKENS}_ci95": summary[f"{COSINE_MASKED}_ci95"],
            BASELINE: theirs.cosine_masked(),
            f"{TOKENS}_minus_{BASELINE}": paired_difference(
                ratio_of_sums, mine.masked_terms(), theirs.masked_terms(), SEED
            ),
            "exact_text": float(np.mean(exact)),
            "examples": [
                {"target": texts[r], "decoded": d}
                for r, d in zip(rows[:6], decoded[:6], strict=False)
            ],
        }
    return out


def combination(
    decode: Decode, queries: Deprojector, clip: ClipText, shards: Path, params: Params
) -> dict:
    """Evaluate's combination test: for held-out pairs, Σ(e_k − null) + null decoded, against
    H("A B"); beside `queries`' generation and blend (the averaged states of A and B)."""
    captions = split_texts(ShardReader(shards / "test", queries.config.hidden_size))
    pairs = combination_pairs(
        list(dict.fromkeys(captions)), params.evaluate.combination_pairs, params.evaluate.seed, clip
    )
    a = encode_texts(clip, [p[0] for p in pairs])
    b = encode_texts(clip, [p[1] for p in pairs])
    joined = encode_texts(clip, [f"{x} {y}" for x, y in pairs])
    embeds = combine_embeddings(torch.stack([a.pooled, b.pooled], dim=1), queries.null.float())
    predictions = {
        TOKENS: answer_of(decode, clip)(embeds),
        BASELINE: queries.generate(embeds),
        BLEND: (a.hidden + b.hidden) / 2,
    }
    terms = {
        name: masked_cosine_terms(cosine_per_position(pred.float(), joined.hidden), joined.mask)
        for name, pred in predictions.items()
    }
    terms = {k: (t.double().numpy(), c.double().numpy()) for k, (t, c) in terms.items()}
    out: dict = {"pairs": len(pairs)}
    for name, (total, count) in terms.items():
        out |= ratio_with_ci(name, total, count, SEED)
    for other in (BASELINE, BLEND):
        out[f"{TOKENS}_minus_{other}"] = paired_difference(
            ratio_of_sums, terms[TOKENS], terms[other], SEED
        )
    return out


def pictures(
    decode: Decode, queries: Deprojector, clip: ClipText, params: Params, prompts: int
) -> dict:
    """Evaluate's adherence on `prompts` held-out prompts per kind: reference, `queries`,
    `tokens` and blend (comma prompts); `tokens` paired against `queries` and blend."""
    params = dataclasses.replace(
        params, evaluate=dataclasses.replace(params.evaluate, adherence_prompts=prompts)
    )
    reference, deprojecting = PromptEncoder(clip), PromptEncoder(clip, queries)
    held_out: dict[str, list[str]] = {}  # kind -> evaluate's held-out prompts
    decoded: dict[str, list[str]] = {}

    def tokens_row(texts: list[str], kind: str) -> torch.Tensor:
        held_out[kind] = texts
        decoded[kind] = decode(embeddings(deprojecting, texts, kind))
        return reference.encode_prompts(decoded[kind], combine=False, deproject=False)

    def blend_row(texts: list[str], kind: str) -> torch.Tensor | None:
        return torch.cat([reference.encode_blend(t) for t in texts]) if kind == "multi" else None

    world = World.of(params.base.clip, params.base.sd)
    single, multi = params.render.prompts(True)
    summary, per_prompt = evaluate_adherence(
        params,
        {REFERENCE: reference, BASELINE: deprojecting},
        load_pipeline(params.base.sd, params.render),
        Scorer.load(params.base.clip, world),
        set(single) | set(multi),
        baselines={TOKENS: tokens_row, BLEND: blend_row},
    )
    out: dict = {}
    for kind, rows in summary.items():
        keep = (ADHERENCE, ALL_PARTS, f"{ADHERENCE}_ratio")
        out[kind] = {
            name: {k: v for k, v in row.items() if k.split("_ci95")[0] in keep}
            for name, row in rows.items()
        }
        for other in (BASELINE, BLEND):
            if other in per_prompt[kind]:
                out[kind][f"{TOKENS}_minus_{other}"] = paired_difference(
                    np.mean,
                    [column(per_prompt[kind][TOKENS], ADHERENCE)],
                    [column(per_prompt[kind][other], ADHERENCE)],
                    SEED,
                )
        out[kind]["examples"] = [
            {"prompt": p, "decoded": d}
            for p, d in zip(held_out[kind][:8], decoded[kind][:8], strict=False)
        ]
    return out


def image_prompts(
    decode: Decode, queries: Path, clip: ClipText, params: Params, count: int
) -> dict:
    """Evaluate's image-prompt test on `count` held-out drawn scenes: each scene through the
    vision tower and `queries`' bridge (its gap statistics) as the only prompt, against its
    description, for `queries` (the image embedding deprojected) and `tokens` (decoded to a
    prompt); image / text = image adherence / the same row's text adherence (the
    description's embedding deprojected or decoded), over the same resampled scenes."""
    e = params.evaluate
    world = World.of(params.base.clip, params.base.sd)
    single, multi = params.render.prompts(True)
    exclude = set(single) | set(multi)
    scenes = world.held_out_scenes(count, e.seed + 1, exclude, distinct=True)
    texts = [world.describe(scene, " ") for scene in scenes]
    encoder = PromptEncoder.from_pretrained(queries, images=True)
    image_embeds = encoder.image_embedding(world.draw(scenes, e.seed))
    text_embeds = embeddings(encoder, texts, "single")
    reference = PromptEncoder(clip)

    def decoded_states(embeds: torch.Tensor) -> torch.Tensor:
        return reference.encode_prompts(decode(embeds), combine=False, deproject=False)

    conditionings = {
        REFERENCE: reference.encode_prompts(texts, combine=False, deproject=False),
        f"{BASELINE}_text": encoder.deproject(text_embeds),
        f"{BASELINE}_image": encoder.deproject(image_embeds),
        f"{TOKENS}_text": decoded_states(text_embeds),
        f"{TOKENS}_image": decoded_states(image_embeds),
    }
    scores = judged_rows(
        load_pipeline(params.base.sd, params.render),
        conditionings,
        reference.encode_negative("", deproject=False),
        params,
        prompt_seeds(e.seed + 1, len(scenes)),
        Scorer.load(params.base.clip, world),
        texts,
    )
    out: dict = {"scenes": len(scenes)}
    for name, rows in scores.items():
        out |= mean_with_ci(name, column(rows, ADHERENCE), SEED)
    for row in (BASELINE, TOKENS):
        out |= ratio_with_ci(
            f"{row}_image_to_text",
            column(scores[f"{row}_image"], ADHERENCE),
            column(scores[f"{row}_text"], ADHERENCE),
            SEED,
        )
    return out


def run(
    decoder_kind: str = "autoregressive",
    candidates: int = 1,
    rank: str = "whole",
    epochs: int | None = None,
    prompts: int | None = None,
    rows: int | None = None,
    params_file: Path = Path("params.yaml"),
    shards: Path = Path("data/shards"),
    models: Path = Path("models"),
) -> dict:
    """Train the decoder, then its states, combination and pictures beside `queries`; each
    part printed as it lands."""
    params = load_params(params_file)
    if read_meta(shards)["base_clip"] != params.base.clip:
        raise SystemExit(f"{shards}: extracted with another base.clip; rerun `dvc repro`")
    clip = load_clip(params.base.clip)
    epochs = epochs or params.train.epochs
    decoder, history, seconds = train_decoder(decoder_kind, params, shards, clip, epochs, rows)
    queries = Deprojector.from_pretrained(models / BASELINE).eval()
    decode = partial(decoded_prompts, decoder, clip, candidates=candidates, rank=rank)
    result = {
        "decoder": decoder_kind,
        "candidates": candidates,
        "rank": rank,
        "epochs": epochs,
        "train_rows": rows,
        "vocabulary": len(decoder.vocab),
        "train_seconds": round(seconds, 1),
        "history": history,
        "states": states_scores(decode, queries, clip, shards, params),
    }
    print(json.dumps(result["states"]))
    result["combination"] = combination(decode, queries, clip, shards, params)
    print(json.dumps(result["combination"]))
    result["pictures"] = pictures(
        decode, queries, clip, params, prompts or params.evaluate.adherence_prompts
    )
    result["image_prompts"] = image_prompts(
        decode, models / BASELINE, clip, params, prompts or params.evaluate.image_prompts
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", choices=DECODERS, default=DECODERS[0])
    parser.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="prompts decoded per embedding (greedy + sampled); the one whose CLIP embedding "
        "is closest to the input is kept (1: greedy alone)",
    )
    parser.add_argument(
        "--rank",
        choices=RANKS,
        default=RANKS[0],
        help="how candidates are compared with the input: whole (the prompt's own embedding) "
        f"or parts (the prompt cut into up to {MAX_PARTS} parts, their offsets summed, the "
        "best cut)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: train.epochs")
    parser.add_argument("--prompts", type=int, default=None, help="default: evaluate's")
    parser.add_argument("--tiny", action="store_true", help=f"smoke-test sizes ({TINY})")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else {"epochs": args.epochs, "prompts": args.prompts}
    result = run(args.decoder, args.candidates, args.rank, **sizes)
    if args.out:
        write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
