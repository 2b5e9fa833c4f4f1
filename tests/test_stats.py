"""The one gate rule (forgelib.stats) against independent references: scipy's exact binomial test (McNemar), a
paired bootstrap, simulated coverage and power, and worked examples."""
import math
import random

import pytest
from scipy import stats as sps

from forgelib.stats import (compare, lower_bound, mcnemar_exact_p, noninferior, questions_needed, superior,
                            upper_bound, z_value)


def _pairs(both, lost, gained, neither):
    before = [1] * both + [1] * lost + [0] * gained + [0] * neither
    after = [1] * both + [0] * lost + [1] * gained + [0] * neither
    return before, after


def test_table_counts_a_worked_example():
    before, after = [1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 0]
    c = compare(before, after)
    assert (c.n, c.both, c.lost, c.gained, c.neither) == (6, 2, 1, 2, 1)
    assert c.before == pytest.approx(3 / 6) and c.after == pytest.approx(4 / 6)
    assert c.diff == pytest.approx(1 / 6) and c.discordance == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="same questions"):
        compare([1, 0], [1])


@pytest.mark.parametrize("lost,gained", [(3, 12), (10, 20), (25, 40), (40, 25), (8, 9)])
def test_mcnemar_p_equals_scipy_exact_binomial(lost, gained):
    ref = sps.binomtest(gained, lost + gained, 0.5, alternative="greater").pvalue
    assert mcnemar_exact_p(lost, gained) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("both,lost,gained,neither", [(300, 20, 40, 140), (150, 30, 30, 90), (500, 10, 35, 55),
                                                      (120, 45, 20, 115)])
def test_margin_zero_decision_matches_exact_mcnemar(both, lost, gained, neither):
    """At margin 0 the bound is a one-sided test of "after better"; its p-value (the confidence at which the bound
    touches 0) agrees with the exact McNemar mid-p-value (scipy's binomial, half the observed point's mass left out)
    to within 0.02 at these sizes, and it decides as the exact test does at 5 %."""
    c = compare(*_pairs(both, lost, gained, neither))
    n = c.n + 2.0
    pl, pg = (lost + 0.5) / n, (gained + 0.5) / n
    z = (pg - pl) / math.sqrt((pg + pl - (pg - pl) ** 2) / n)
    p_wald = 1 - sps.norm.cdf(z)
    mid_p = mcnemar_exact_p(lost, gained) - 0.5 * sps.binom.pmf(gained, lost + gained, 0.5)
    assert p_wald == pytest.approx(mid_p, abs=0.02)
    assert (lower_bound(c, 0.95) > 0) == (mcnemar_exact_p(lost, gained) < 0.05)


def test_lower_bound_matches_a_paired_bootstrap():
    rng = random.Random(0)
    before, after = _pairs(400, 35, 25, 140)
    c = compare(before, after)
    pairs = list(zip(before, after))
    diffs = sorted(sum(a - b for b, a in (rng.choice(pairs) for _ in pairs)) / len(pairs) for _ in range(4000))
    assert lower_bound(c, 0.95) == pytest.approx(diffs[int(0.05 * len(diffs))], abs=0.006)
    assert upper_bound(c, 0.95) == pytest.approx(diffs[int(0.95 * len(diffs))], abs=0.006)


def _simulate(n, p_lost, p_gained, rng):
    lost = gained = 0
    for _ in range(n):
        u = rng.random()
        lost += u < p_lost
        gained += p_lost <= u < p_lost + p_gained
    both = (n - lost - gained) // 2
    return compare(*_pairs(both, lost, gained, n - lost - gained - both))


def test_coverage_of_the_one_sided_bound_is_nominal():
    rng = random.Random(1)
    true_diff = 0.06 - 0.10
    covered = sum(lower_bound(_simulate(150, 0.10, 0.06, rng), 0.95) < true_diff for _ in range(2000))
    assert 0.93 <= covered / 2000 <= 0.975  # the bound lies below the truth ~95 % of the time


def test_questions_needed_formula_and_simulated_power():
    # worked example: (1.6449 + 1.2816)^2 * 0.2 / 0.05^2 = 685.1 -> 686
    assert questions_needed(0.05, 0.95, 0.9, 0.2) == 686
    assert questions_needed(0.10, 0.95, 0.999, 0.15) == math.ceil((z_value(0.95) + z_value(0.999)) ** 2 * 0.15 / 0.01)
    n = questions_needed(0.08, 0.95, 0.9, 0.2)
    rng = random.Random(2)
    passes = sum(lower_bound(_simulate(n, 0.1, 0.1, rng), 0.95) > -0.08 for _ in range(1000))
    assert 0.87 <= passes / 1000 <= 0.95  # the power it was sized for
    few = sum(lower_bound(_simulate(n // 4, 0.1, 0.1, rng), 0.95) > -0.08 for _ in range(1000))
    assert few / 1000 < 0.6  # a quarter of the questions: a coin toss, which the rule exists to avoid


def test_noninferior_passes_identical_models_and_fails_a_real_loss():
    same = [1, 0, 1, 1] * 50
    v = noninferior("same", same, same, margin=0.05)
    assert v.passed and v.diff == 0 and v.lower > -0.05
    before, after = _pairs(100, 60, 5, 35)  # lost 55 of 200 net: diff -0.275
    v = noninferior("worse", before, after, margin=0.10)
    assert not v.passed and v.diff == pytest.approx(-0.275) and v.lower < -0.10


def test_a_verdict_with_too_few_questions_names_the_number_it_needs():
    before, after = _pairs(10, 3, 1, 6)  # 20 questions, 4 disagree: diff -0.10
    v = noninferior("few", before, after, margin=0.15, confidence=0.95, power=0.999)
    assert not v.passed
    assert v.needed == questions_needed(0.15, 0.95, 0.999, 4 / 20) and v.needed > 20
    assert f"{v.needed} needed" in v.note and "20 asked" in v.note
    enough = _pairs(10 * 40, 3 * 40, 3 * 40, 6 * 40)
    assert noninferior("enough", *enough, margin=0.10).note == ""
    assert noninferior("clear loss", *_pairs(10, 8, 0, 2), margin=0.15).note == ""  # -0.4: no count would help


def test_superiority_needs_a_gain_beyond_noise():
    before, after = _pairs(200, 10, 60, 130)  # +0.125 with little discordance
    assert superior("gain", before, after).passed
    before, after = _pairs(200, 30, 36, 134)  # +0.015: not shown
    assert not superior("tie", before, after).passed


def test_suite_mean_verdict_weighs_families_equally_and_matches_a_stratified_bootstrap():
    """noninferior_over: the mean of the families' differences, not the pooled questions (a family asked 10x the
    questions weighs the same); its bound against a stratified paired bootstrap (each family resampled within
    itself) and simulated coverage."""
    from forgelib.stats import noninferior_over

    strata = {"a": _pairs(300, 60, 10, 30), "b": _pairs(30, 1, 2, 7), "c": _pairs(50, 4, 4, 22)}
    v = noninferior_over("all", strata, 0.1)
    diffs = {f: compare(*p).diff for f, p in strata.items()}
    assert v.diff == pytest.approx(sum(diffs.values()) / 3, abs=1e-4)  # -0.05 / 3 ... not the pooled -0.089
    pooled = noninferior("all", [x for b, _ in strata.values() for x in b], [x for _, a in strata.values() for x in a],
                         0.1)
    assert pooled.diff < v.diff - 0.05  # pooling lets the big family decide
    assert v.n == 400 + 40 + 80 and v.before == pytest.approx(sum(compare(*p).before for p in strata.values()) / 3,
                                                             abs=1e-4)
    rng = random.Random(3)
    pairs = {f: list(zip(*p)) for f, p in strata.items()}
    boot = sorted(sum(sum(a - b for b, a in (rng.choice(ps) for _ in ps)) / len(ps) for ps in pairs.values()) / 3
                  for _ in range(3000))
    assert v.lower == pytest.approx(boot[int(0.05 * len(boot))], abs=0.01)
    # coverage: three families of unequal sizes and true differences; the bound lies below the truth ~95 % of the time
    rng = random.Random(4)
    truth = ((0.02 - 0.10) + (0.05 - 0.05) + (0.10 - 0.04)) / 3
    covered = 0
    for _ in range(1000):
        tables = {f: _simulate(n, pl, pg, rng) for f, (n, pl, pg) in
                  {"a": (400, 0.10, 0.02), "b": (60, 0.05, 0.05), "c": (120, 0.04, 0.10)}.items()}
        s = {f: _pairs(c.both, c.lost, c.gained, c.neither) for f, c in tables.items()}
        covered += noninferior_over("all", s, 0.1).lower < truth
    assert 0.92 <= covered / 1000 <= 0.98
    assert noninferior_over("none", {}, 0.1).note == "no questions"
