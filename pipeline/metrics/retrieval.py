"""The retrieval baseline: answer an embedding with the hidden states of its nearest training
rows, the bar a deprojector must clear to be more than a lookup table.

    neighbours(e) = the k training rows with the highest cos(e − null, e_row − null)
    answer(e)     = mean of their hidden states [77, D]   (position 0: the constant sos)

No teacher forcing: the answer depends on the embedding only. k is chosen on a validation
split of the training rows (pipeline/stages/evaluate.py, `choose_k`), never on test rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.conventions import MAX_LENGTH
from pipeline.data.shards import ShardReader

# Up to 256: at 50,000 training rows the validation score still rises from k = 32 to 64.
K_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Retrieval:
    """Nearest neighbours among `rows` of `reader` (all its rows by default) by the cosine of
    e − null, answered with the mean of their hidden states.

    Memory: the database's normalised keys [N, D] float32 (50,000 rows at D = 768: 154 MB);
    per query batch of b rows, the similarities [b, N] float32 (b = 100: 20 MB) and one
    [b, 77, D] float32 mean per answered k (24 MB each at b = 100, D = 768). The hidden
    states stay in the memory-mapped shards: each neighbour rank's b rows are copied out in
    turn and added to a running sum.
    """

    def __init__(
        self, reader: ShardReader, null: torch.Tensor, rows: np.ndarray | None = None
    ) -> None:
        self.reader = reader
        self.rows = np.arange(len(reader)) if rows is None else np.asarray(rows)
        self.null = null.float()
        self.keys = self._normalised(reader.embeddings()[torch.from_numpy(self.rows)])

    def __len__(self) -> int:
        return len(self.rows)

    def _normalised(self, embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeds.float() - self.null, dim=-1)

    def neighbours(self, embeds: torch.Tensor, k: int) -> np.ndarray:
        """[b, k] reader row indices of the k nearest database rows of each embedding [b, D],
        nearest first."""
        similarity = self._normalised(embeds) @ self.keys.T  # [b, N]
        return self.rows[similarity.topk(k, dim=1).indices.numpy()]

    def answers(self, embeds: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
        """{k: [b, 77, D] mean hidden states of the k nearest rows} for every k of `ks`,
        from one neighbour search (the means of the first 1, 2, … neighbours)."""
        nearest = self.neighbours(embeds, max(ks))
        total = torch.zeros(len(embeds), MAX_LENGTH, self.reader.hidden_size)
        means = {}
        for rank in range(max(ks)):
            total += self.reader.batch(nearest[:, rank]).hidden
            if rank + 1 in ks:
                means[rank + 1] = total / (rank + 1)
        return means

    def answer(self, embeds: torch.Tensor, k: int) -> torch.Tensor:
        """[b, 77, D]: the mean hidden states of each embedding's k nearest rows."""
        return self.answers(embeds, [k])[k]
