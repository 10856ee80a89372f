"""pooled_lookup: same values and gradients as plain per-occurrence loops, in every pooling mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_bagpipe.data.batch import CacheLookup, PoolingIndex, SparseFeatures, group_by_row
from lightning_bagpipe.embedding.pooling import pooled_lookup


def _reference(rows, inverse, lengths, num_features, mode, w, grad_out):
    """Plain loops over key-major bags: bag ``f * B + b`` pools into output ``[b, f]``."""
    b_size = lengths.numel() // num_features
    out = torch.zeros(b_size, num_features, rows.shape[1], dtype=torch.float64)
    grad_rows = torch.zeros(rows.shape, dtype=torch.float64)
    i = 0
    for bag, n in enumerate(lengths.tolist()):
        f, b = divmod(bag, b_size)
        for _ in range(n):
            r = int(inverse[i])
            c = (1.0 / n) if mode == "mean" else (1.0 if w is None else float(w[i]))
            out[b, f] += c * rows[r].double()
            grad_rows[r] += c * grad_out[b, f]
            i += 1
    return out, grad_rows


@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
@pytest.mark.parametrize("hot", ["one", "multi"])
@pytest.mark.parametrize("prebuilt", [True, False])
def test_values_and_gradients_match_reference(mode: str, hot: str, prebuilt: bool) -> None:
    g = torch.Generator().manual_seed(3)
    n_rows, num_features, b_size, dim = 13, 3, 11, 5
    bags = num_features * b_size
    if hot == "one":
        lengths = torch.ones(bags, dtype=torch.long)
    else:
        lengths = torch.randint(0, 4, (bags,), generator=g)
    inverse = torch.randint(0, n_rows, (int(lengths.sum()),), generator=g)
    inverse[:n_rows] = torch.arange(n_rows)  # every row is read at least once, as in a real lookup
    inverse = inverse[torch.randperm(inverse.numel(), generator=g)]
    w = torch.rand(inverse.numel(), generator=g) if mode == "weighted" else None
    rows = torch.randn(n_rows, dim, generator=g).requires_grad_()
    if prebuilt:
        lookup = CacheLookup.from_inverse(torch.arange(n_rows), inverse, lengths, num_features)
        assert lookup.pooling is not None and lookup.pooling.order is not None
        index = lookup.pooling
    else:
        index = PoolingIndex.from_lookup(inverse, lengths, num_features, n_rows, grouped=False)
    out = pooled_lookup(
        rows, index, b_size, num_features, mode="mean" if mode == "mean" else "sum", weights=w
    )
    grad_out = torch.arange(out.numel(), dtype=torch.float64).view(out.shape) / 7 - 3
    ref_out, ref_grad = _reference(rows.detach(), inverse, lengths, num_features, mode, w, grad_out)
    out.backward(grad_out.float())
    assert out.shape == (b_size, num_features, dim) and out.is_contiguous()
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert rows.grad is not None
    assert torch.allclose(rows.grad.double(), ref_grad, atol=1e-4)


def test_group_by_row_is_stable_and_complete() -> None:
    inverse = torch.tensor([2, 0, 2, 1, 0, 2])
    order, starts = group_by_row(inverse, 4)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]
    assert starts.tolist() == [0, 2, 3, 6]  # row 3 is never read: an empty group at the end


def test_sample_major_permutation() -> None:
    # 2 features x 2 samples, key-major lengths [f0b0, f0b1, f1b0, f1b1] = [2, 0, 1, 3]
    lengths = torch.tensor([2, 0, 1, 3])
    index = PoolingIndex.from_lookup(torch.arange(6), lengths, 2, 6)
    # sample-major bags: (b0,f0) = occ 0,1; (b0,f1) = occ 2; (b1,f0) = none; (b1,f1) = occ 3,4,5
    assert index.perm.tolist() == [0, 1, 2, 3, 4, 5]
    assert index.offsets.tolist() == [0, 2, 3, 3]
    lengths = torch.tensor([1, 2, 1, 1])
    index = PoolingIndex.from_lookup(torch.arange(5), lengths, 2, 5)
    # (b0,f0)=occ 0; (b0,f1)=occ 3; (b1,f0)=occ 1,2; (b1,f1)=occ 4
    assert index.perm.tolist() == [0, 3, 1, 2, 4]
    assert index.offsets.tolist() == [0, 1, 2, 4]


def test_weights_needing_gradient_take_autograd_path() -> None:
    rows = torch.randn(3, 2, requires_grad=True)
    w = torch.rand(4, requires_grad=True)
    inverse = torch.tensor([0, 2, 1, 2])
    index = PoolingIndex.from_lookup(inverse, torch.tensor([2, 2]), 1, 3)
    out = pooled_lookup(rows, index, 2, 1, weights=w)
    out.sum().backward()
    assert w.grad is not None and rows.grad is not None
    assert torch.allclose(w.grad, rows.detach()[inverse].sum(1))


@pytest.mark.parametrize("num_rows", [300, 70_000])  # 16-bit radix path and the 32-bit torch path
def test_group_by_row_matches_a_stable_sort(num_rows: int) -> None:
    g = torch.Generator().manual_seed(1)
    inverse = torch.randint(0, num_rows, (5000,), generator=g)
    order, starts = group_by_row(inverse, num_rows)
    assert order.tolist() == sorted(range(5000), key=lambda i: (int(inverse[i]), i))
    counts = torch.bincount(inverse, minlength=num_rows)
    assert starts.tolist() == (torch.cumsum(counts, 0) - counts).tolist()


def test_from_dict_and_from_lengths_refuse_what_would_pair_the_wrong_ids() -> None:
    # features with different numbers of bags were regrouped silently (user 3 became item sample 0)
    with pytest.raises(ValueError, match=r"one bag per sample: 'user' has 3 bags but 'item' has 1"):
        SparseFeatures.from_dict({"user": [[1], [2], [3]], "item": [[4]]})
    with pytest.raises(ValueError, match=r"values must be 1-D .* got shape \(4, 1\)"):
        SparseFeatures.from_lengths(["a", "b"], np.zeros((4, 1), dtype=np.int64), np.ones(4, dtype=np.int64))
    empty = SparseFeatures.from_dict({"a": [], "b": []})  # (lengths were a float tensor: a dtype error)
    assert empty.batch_size == 0 and empty.lengths.dtype == torch.long
