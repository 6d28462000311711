from __future__ import annotations

import torch

from pipeline.metrics.losses import cosine_per_position, mse, position_weights, weighted_mse

N = 77


def mask_of(lengths: list[int]) -> torch.Tensor:
    """Attention masks with the first `length` positions set (sos, tokens, eos)."""
    return (torch.arange(N)[None] < torch.tensor(lengths)[:, None]).long()


def test_position_weights() -> None:
    mask = mask_of([5, N, 1])
    weights = position_weights(mask)
    assert weights.shape == (3, N)
    assert torch.all(weights[:, 0] == 0)
    torch.testing.assert_close(weights.mean(dim=1), torch.ones(3))
    # Inside the mask : padding = 25 : 1.
    torch.testing.assert_close(weights[0, 1:5] / weights[0, 5], torch.full((4,), 25.0))
    # Fully masked: uniform over positions 1..76.
    torch.testing.assert_close(weights[1, 1:], torch.full((N - 1,), N / (N - 1)))
    # Only sos in the mask: every other position is padding.
    torch.testing.assert_close(weights[2, 1:], torch.full((N - 1,), N / (N - 1)))
    ratio = position_weights(mask, mask_weight=4.0)
    torch.testing.assert_close(ratio[0, 1] / ratio[0, 10], torch.tensor(4.0))


def test_weighted_mse_by_hand() -> None:
    D = 2
    target = torch.zeros(1, N, D)
    pred = torch.zeros(1, N, D)
    pred[0, 0] = 100.0  # position 0 has weight 0
    pred[0, 1] = torch.tensor([1.0, 1.0])  # in the mask: squared error 2
    pred[0, 10] = torch.tensor([2.0, 0.0])  # padding: squared error 4
    mask = mask_of([3])
    # Raw weights: 0, 25, 25, then 74 ones -> sum 124; normalised: raw * 77 / 124.
    # Mean over 77 positions and D = 2: (25 * 2 + 1 * 4) * 77 / 124 / (77 * 2).
    expected = (25 * 2 + 1 * 4) / 124 / 2
    torch.testing.assert_close(weighted_mse(pred, target, mask), torch.tensor(expected))
    # Float16 targets (the storage dtype) are compared in the prediction's dtype.
    torch.testing.assert_close(weighted_mse(pred, target.half(), mask), torch.tensor(expected))


def test_mse_ignores_position_0() -> None:
    target = torch.zeros(2, N, 4)
    pred = torch.zeros(2, N, 4)
    pred[:, 0] = 5.0
    pred[:, 1:] = 0.5
    torch.testing.assert_close(mse(pred, target), torch.tensor(0.25))


def test_cosine_per_position() -> None:
    target = torch.randn(2, N, 8)
    assert cosine_per_position(target, target).shape == (2, N)
    torch.testing.assert_close(cosine_per_position(target, target), torch.ones(2, N))
    torch.testing.assert_close(cosine_per_position(-target, target), -torch.ones(2, N))
    torch.testing.assert_close(
        cosine_per_position(3 * target, target.half()), torch.ones(2, N), atol=1e-3, rtol=0
    )


def test_masked_cosine_averages_the_predicted_in_mask_positions() -> None:
    from pipeline.metrics.losses import masked_cosine, predicted_in_mask

    mask = mask_of([3, 1])  # row 0: sos + 2 positions; row 1: sos only
    target = torch.randn(2, N, 8)
    pred = target.clone()
    pred[0, 2] = -target[0, 2]  # cosine -1 at one of the 3 counted positions
    pred[:, 0] = -target[:, 0]  # sos is never counted
    pred[:, 3:] = torch.randn(2, N - 3, 8)  # padding is not counted
    assert predicted_in_mask(mask).sum() == 2
    torch.testing.assert_close(masked_cosine(pred, target, mask), torch.tensor(0.0))


def test_combine_embeddings_adds_parts_relative_to_null() -> None:
    from pipeline.core.conventions import combine_embeddings

    null, a, b = torch.randn(3, 8)
    torch.testing.assert_close(combine_embeddings(torch.stack([a, b]), null), a + b - null)
    torch.testing.assert_close(combine_embeddings(a[None], null), a)  # one part: itself
    batch = torch.stack([torch.stack([a, b]), torch.stack([b, b])])  # [2, K=2, D]
    torch.testing.assert_close(combine_embeddings(batch, null)[1], 2 * b - null)


def test_atomic_path_replaces_only_when_complete(tmp_path) -> None:
    import pytest

    from pipeline.core.atomic import atomic_path

    target = tmp_path / "sub" / "x.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "one"
    assert list(target.parent.iterdir()) == [target]  # no temporary file left
