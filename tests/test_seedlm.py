"""SeedLM core: the LFSR against its recurrence and its maximal period, exact reconstruction of a block built from
a known seed, the bit count, and a matrix round trip."""
import pytest
import torch

from forgelib.quant.seedlm import (TAPS, SeedLMConfig, basis, bits_per_weight, compress_matrix, decompress_matrix,
                                   lfsr_states, reconstruct, seed_search)


def reference_lfsr(seed: int, K: int, n: int) -> list[int]:
    """The textbook Fibonacci LFSR, one bit at a time: b_new = XOR of the tapped bits; state = (state >> 1) | b_new << (K-1)."""
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


def test_a_matrix_round_trips_with_a_bounded_error():
    config = SeedLMConfig(K=10, C=8, P=4)
    torch.manual_seed(1)
    w = torch.randn(12, 10) * 0.05
    packed = compress_matrix(w, config)
    back = decompress_matrix(packed, config)
    assert back.shape == w.shape and packed["pad"] == (-120) % 8
    rel = float(((back - w) ** 2).sum() / (w ** 2).sum())
    assert rel < 0.5  # 4 of 8 dimensions per block fitted by the best of 1023 random bases, 4-bit coefficients
    assert packed["seconds_per_block"] > 0
