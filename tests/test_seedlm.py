"""SeedLM core: the LFSR against its recurrence and its maximal period, exact reconstruction of a block built from
a known seed, the bit count, and a matrix round trip."""
import pytest
import torch

from forgelib.quant.seedlm import (TAPS, SeedLMConfig, basis, bits_per_weight, compress_matrix, decompress_matrix,
                                   lfsr_states, reconstruct, seed_search)


def reference_lfsr(seed: int, K: int, n: int) -> list[int]:
    """The textbook Fibonacci LFSR, one bit at a time: b_new = XOR of the tapped bits;
    state = (state >> 1) | b_new << (K-1)."""
    state, out = seed, []
    for _ in range(n):
        bit = 0
        for t in TAPS[K]:
            bit ^= (state >> (K - t)) & 1
        state = (state >> 1) | (bit << (K - 1))
        out.append(state)
    return out


@pytest.mark.parametrize("K", [4, 8, 12])
def test_lfsr_follows_its_recurrence_and_has_the_maximal_period(K):
    seeds = torch.tensor([1, 5, (1 << K) - 1])
    states = lfsr_states(seeds, K, 40)
    for i, s in enumerate(seeds.tolist()):
        assert states[i].tolist() == reference_lfsr(s, K, 40)
    period = (1 << K) - 1
    run = lfsr_states(torch.tensor([1]), K, period)[0].tolist()
    assert len(set(run)) == period and run[-1] == 1 and 0 not in run  # every non-zero state once, back to the seed


def test_a_block_built_from_a_known_seed_is_found_and_reconstructed_exactly():
    config = SeedLMConfig(K=8, C=8, P=3, top=8)
    torch.manual_seed(0)
    seeds = torch.tensor([7, 100, 201, 33])
    coefs = torch.randint(-8, 8, (4, 3)).to(torch.int8)
    coefs[:, 0] = torch.tensor([7, -8, 5, -6], dtype=torch.int8)  # the largest |coef| fixes the exponent
    exps = torch.tensor([-3, -5, -2, -4], dtype=torch.int8)
    blocks = reconstruct(seeds, coefs, exps, config)
    found = seed_search(blocks, config)
    assert found["seed"].tolist() == seeds.tolist()
    assert torch.equal(found["coef"], coefs) and torch.equal(found["exp"], exps)
    assert float(found["error"].max()) < 1e-10
    assert torch.allclose(reconstruct(found["seed"], found["coef"], found["exp"], config), blocks, atol=1e-6)


def test_bits_per_weight_count_seed_exponent_and_coefficients():
    assert bits_per_weight(SeedLMConfig(K=16, C=8, P=3)) == (16 + 4 + 12) / 8 == 4.0
    assert bits_per_weight(SeedLMConfig(K=16, C=12, P=4)) == 3.0


def test_basis_values_lie_in_the_open_interval_and_differ_between_seeds():
    u = basis(torch.arange(1, 256), SeedLMConfig(K=8, C=8, P=3))
    assert u.shape == (255, 8, 3) and float(u.abs().max()) < 1.0
    assert len({tuple(m.flatten().tolist()) for m in u}) == 255


def test_a_matrix_round_trips_with_an_error_the_seed_search_earns():
    """The search over all 1023 seeds must beat not searching by far. Relative squared errors, measured: the seed
    search 0.033; every block fitted (unquantized) on seed 1, 0.541, or on a random seed, 0.53; the search left out
    of seed_search (seed 1, 4-bit coefficients) 0.546. And no block can beat the best unquantized least-squares fit
    over every seed, found here by brute force in float64 (0.021 in all)."""
    config = SeedLMConfig(K=10, C=8, P=4)
    torch.manual_seed(1)
    w = torch.randn(12, 10) * 0.05
    packed = compress_matrix(w, config)
    back = decompress_matrix(packed, config)
    assert back.shape == w.shape and packed["pad"] == (-120) % 8
    blocks = w.reshape(-1, 8).double()  # 120 weights: 15 blocks, no padding
    total = float((blocks ** 2).sum())
    rel = float(((back - w) ** 2).sum()) / total
    # brute force: the least-squares residual of every block on every seed's basis (float64, lstsq, no pinv)
    u = basis(torch.arange(1, 1 << config.K), config).double()  # (1023, 8, 4)
    n, s = len(blocks), len(u)
    fit = torch.linalg.lstsq(u[None].expand(n, -1, -1, -1), blocks[:, None, :, None].expand(-1, s, -1, -1)).solution
    residual = ((torch.einsum("scp,nsp->nsc", u, fit[..., 0]) - blocks[:, None]) ** 2).sum(-1)  # (15, 1023)
    best = residual.min(1).values
    fixed_seed = float(residual[:, 0].sum()) / total  # no search: seed 1 for every block
    random_seed = float(residual[torch.arange(n), torch.randint(s, (n,), generator=torch.Generator().manual_seed(0))]
                        .sum()) / total
    assert min(fixed_seed, random_seed) > 0.4  # a 4-dimensional random subspace of 8 keeps about half the energy
    assert rel < 0.1 and rel < 0.2 * min(fixed_seed, random_seed)
    assert bool((packed["error"].double() >= best * (1 - 1e-4)).all())  # quantized: never below the best fit
    assert rel < 2.5 * float(best.sum()) / total  # and the 4-bit coefficients cost little beside it
    # the error the search reports is the error of the reconstruction it hands back
    assert float(packed["error"].sum()) == pytest.approx(float(((back - w) ** 2).sum()), rel=1e-4)
