"""A CLIP-format byte-level BPE tokenizer trained on the world's captions.

Normalised and pre-split exactly as `CLIPTokenizer`, with `</w>` word ends, and laid out like
CLIP's vocabulary (bytes, bytes with `</w>`, merges, then the specials, so EOS has the highest
id). Saved as tokenizer.json plus vocab.json/merges.txt, the files every transformers reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from pipeline.core.atomic import write_text
from pipeline.core.conventions import MAX_LENGTH

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    reference = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = reference.normalizer or normalizers.Lowercase()
    bpe.pre_tokenizer = reference.pre_tokenizer or pre_tokenizers.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    ordered = sorted(alphabet)
    tokens = ordered + [c + "</w>" for c in ordered] + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def train_tokenizer(corpus: list[str], vocab_size: int) -> CLIPTokenizer:
    vocab, merges = _train_bpe(corpus, vocab_size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """tokenizer.json and the slow tokenizer's vocab.json + merges.txt."""
    tokenizer.save_pretrained(folder)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    write_text(folder / "vocab.json", json.dumps(state["vocab"], ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
