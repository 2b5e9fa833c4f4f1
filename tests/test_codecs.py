"""Final-compression codecs: RTN against its error bound and bit count, weighted k-means on separable data, VQ with
a residual codebook, hyper-compression recovering trajectory points exactly and getting closer with more bits."""
import math

import pytest
import torch

from forgelib.quant.codecs import (hyper_bits, hyper_dequantize, hyper_quantize, hyper_search, rtn_bits,
                                   rtn_dequantize, rtn_quantize, trajectory, vq_bits, vq_dequantize, vq_quantize,
                                   weighted_kmeans)


@pytest.mark.parametrize("bits, group", [(8, 64), (4, 32)])
def test_rtn_error_is_at_most_half_a_step_and_the_bits_are_counted(bits, group):
    torch.manual_seed(0)
    w = torch.randn(10, 70)
    q = rtn_quantize(w, bits, group)
    back = rtn_dequantize(q)
    step = q["scale"].float().reshape(10, -1).repeat_interleave(group, 1)[:, :70]
    assert back.shape == w.shape and bool(((back - w).abs() <= step / 2 + 1e-6).all())
    groups = 10 * math.ceil(70 / group)
    assert rtn_bits(q) == groups * group * bits + groups * 16


def test_weighted_kmeans_recovers_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    labels = torch.arange(3).repeat_interleave(20)
    x = centers[labels] + 0.05 * torch.randn(60, 3)
    book, found = weighted_kmeans(x, torch.tensor([1.0, 2.0, 0.5]), 3)
    mapping = {int(found[labels == c][0]) for c in range(3)}
    assert len(mapping) == 3 and all(len(set(found[labels == c].tolist())) == 1 for c in range(3))
    for c in range(3):
        assert torch.allclose(book[int(found[labels == c][0])], x[labels == c].mean(0), atol=1e-5)


def test_vq_round_trip_residual_codebook_and_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    one = vq_quantize(w, v=4, codebook_bits=4, residual=False)
    two = vq_quantize(w, v=4, codebook_bits=4, residual=True)
    err = lambda q: float(((vq_dequantize(q) - w) ** 2).mean())  # noqa: E731
    assert err(two) < err(one) < float((w ** 2).mean())
    n_vec = 32 * 16 // 4
    assert vq_bits(one) == n_vec * 4 + 16 * 4 * 16 + 32 * 16
    assert vq_bits(two) == vq_bits(one) + n_vec * 4 + 16 * 4 * 16


def test_hyper_compression_finds_trajectory_points_and_gets_closer_with_more_bits():
    points = trajectory(4, 10)
    picks = torch.tensor([3, 517, 1000, 64])
    assert hyper_search(points[picks], 10).tolist() == picks.tolist()
    torch.manual_seed(0)
    u = torch.rand(200, 4)
    errs = [float((trajectory(4, b)[hyper_search(u, b)] - u.double()).pow(2).sum(1).mean()) for b in (6, 10, 14)]
    assert errs[0] > errs[1] > errs[2]
    w = torch.randn(8, 16)
    q = hyper_quantize(w, n=4, index_bits=12)
    back = hyper_dequantize(q)
    assert back.shape == w.shape
    # reference: 12 bits for 4 weights are 3 bits each; a uniform 8-level grid over each row's range has the mean
    # squared error span² / (12 · 8²). The trajectory's 4096 points are not a lattice but come close: measured
    # 0.030 against the grid's 0.022, while every row replaced by its mean gives 1.16 and random indices 2.9.
    span = w.amax(1) - w.amin(1)
    grid = float((span ** 2).mean()) / (12 * 8 ** 2)
    mse = lambda approx: float(((approx - w) ** 2).mean())  # noqa: E731
    row_mean = w.mean(1, keepdim=True).expand_as(w)
    random_index = hyper_dequantize({**q, "index": torch.randint(0, 1 << 12, q["index"].shape,
                                                                 generator=torch.Generator().manual_seed(0))})
    assert mse(back) < 3 * grid and mse(row_mean) > 20 * grid and mse(random_index) > 20 * grid
    assert hyper_bits(q) == 8 * 16 // 4 * 12 + 2 * 8 * 16
