"""The statistics behind every interval and verdict (src/sft_spec_plugins/common/uncertainty.py), each
against a known answer: a hand-computed McNemar table, Wilson's interval by its formula, Student's t by its
formula, a two-way clustered variance worked by hand, bootstrap intervals against an independent resampling, Holm on a
textbook example; and each of the four verdicts made to occur."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sft_spec_plugins.common import uncertainty as u

Z = 1.959963984540054


def test_mcnemar_on_a_hand_computed_table():
    # 10 rows went passed -> failed, 2 failed -> passed, 20 passed both times: the exact test is the binomial
    # on the 12 discordant rows, p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    before = [1] * 10 + [0] * 2 + [1] * 20
    after = [0] * 10 + [1] * 2 + [1] * 20
    assert u.mcnemar(before, after) == (10, 2, pytest.approx(158 / 4096))
    assert u.mcnemar([1, 0], [1, 0]) == (0, 0, 1.0)


def test_wilson_interval_by_its_formula():
    k, n = 34, 40
    p = k / n
    centre = (p + Z ** 2 / (2 * n)) / (1 + Z ** 2 / n)
    half = Z / (1 + Z ** 2 / n) * math.sqrt(p * (1 - p) / n + Z ** 2 / (4 * n ** 2))
    estimate = u.proportion([1.0] * k + [0.0] * (n - k))
    assert estimate.value == p and estimate.method == "Wilson" and estimate.rows == 40 and estimate.seeds == 1
    assert estimate.low == pytest.approx(centre - half, abs=1e-9) and estimate.high == pytest.approx(centre + half)
    assert estimate.stderr == pytest.approx(half / Z)  # the interval's half-width over z: never "± 0" at 100%
    assert u.proportion([1.0] * 4).stderr > 0.1


def test_a_mean_over_rows_uses_students_t():
    values = [71.0, 65.0, 80.0, 77.0, 62.0, 70.0]
    estimate = u.mean(values)
    sd = float(np.std(values, ddof=1))
    assert estimate.value == pytest.approx(np.mean(values)) and estimate.stderr == pytest.approx(sd / math.sqrt(6))
    t = 2.5705818366147395  # Student's t, 5 degrees of freedom, 97.5th percentile
    assert estimate.low == pytest.approx(np.mean(values) - t * sd / math.sqrt(6))
    assert estimate.text() == "70.8 ± 2.8 (95%: 63.6 to 78.0)"
    assert u.mean([3.0]).stderr is None and "no interval" in u.mean([3.0]).text()


def test_the_two_way_clustered_variance_worked_by_hand():
    # X[r, s] = a_r + b_s: residuals [[-1.5, .5], [-.5, 1.5]]; row sums (-1, 1): V_rows = 2/16 * 2 = 0.25;
    # seed sums (-2, 2): V_seeds = 8/16 * 2 = 1; cells: 5/16 * 4/3; V = 0.25 + 1 - 5/12.
    variance, df = u.clustered_variance(np.array([[1.0, 3.0], [2.0, 4.0]]))
    assert variance == pytest.approx(0.25 + 1.0 - 5 / 12) and df == 1
    estimate = u.mean([[1.0, 3.0], [2.0, 4.0]])
    assert estimate.seeds == 2 and estimate.method == "clustered by row and seed"
    assert estimate.stderr == pytest.approx(math.sqrt(0.25 + 1.0 - 5 / 12))


def test_one_row_or_one_seed_is_the_one_way_case_a_t_test_on_its_values():
    from scipy import stats

    losses = [1.0, 1.4, 0.9]  # one quantity (a final loss) on three seeds
    variance, df = u.clustered_variance(np.array([losses]))
    assert variance == pytest.approx(stats.sem(losses) ** 2) and df == 2
    d = u.compare("final_loss", [[1.0, 1.4, 0.9]], [[1.45, 0.95, 1.6]], [1, 2, 3], [1, 2, 3], 0.11, False)
    assert d.diff.stderr == pytest.approx(stats.sem([0.45, -0.45, 0.70]))
    assert d.p_worse == pytest.approx(stats.ttest_1samp([0.45, -0.45, 0.70], 0.11, alternative="greater").pvalue)
    u.decide([d])
    assert d.verdict == "inconclusive"  # per-seed changes +.45, -.45, +.70: not a sure rise


def test_welch_on_seed_means_matches_scipy():
    from scipy import stats

    before, after = np.array([[0.9, 0.8, 0.85]] * 10), np.array([[0.6, 0.7, 0.65, 0.62]] * 10)
    d = u.compare("pass_rate", before, after, [1, 2, 3], [4, 5, 6, 7], 0.0)
    expected = stats.ttest_ind([0.6, 0.7, 0.65, 0.62], [0.9, 0.8, 0.85], equal_var=False, alternative="less")
    assert d.p_worse == pytest.approx(expected.pvalue)


def test_a_seed_without_values_is_left_out_not_a_crash():
    x, y = np.full((20, 3), np.nan), np.random.default_rng(0).random((20, 3))
    d = u.compare("mean_rouge_l", x, y, [1, 2, 3], [4, 5, 6], 0.02)  # a metric HEAD added
    u.decide([d])
    assert d.verdict == "inconclusive" and "no value" in d.why
    y[:, 1] = np.nan  # a seed that diverged on every row: the other seeds still compare
    z = np.random.default_rng(1).random((20, 3))
    d = u.compare("mean_rouge_l", z, y, [1, 2, 3], [1, 2, 3], 0.02)
    assert d.diff.seeds == 2
    assert u.holm([math.nan, 0.001, 0.002]) == pytest.approx([1.0, 0.003, 0.004])


def test_a_share_over_seeds_that_passed_everywhere_is_not_certain():
    estimate = u.proportion(np.ones((10, 3)))
    assert estimate.value == 1.0 and estimate.low < 0.75  # at least Wilson's interval over the 10 rows


def test_a_median_over_seeds_resamples_the_seeds_too():
    rng = np.random.default_rng(0)
    matrix = rng.normal(0, 1, (40, 1)) + np.array([0.0, 1.5, -1.5]) + rng.normal(0, 0.1, (40, 3))
    over_seeds = u.median(matrix)
    rows_only = u.median(matrix.mean(axis=1))
    assert over_seeds.method == "bootstrap over seeds, then rows"
    assert over_seeds.high - over_seeds.low > 1.5 * (rows_only.high - rows_only.low)


def test_seed_noise_widens_the_interval_that_rows_alone_would_give():
    rng = np.random.default_rng(0)
    seed_effect = np.array([0.0, -0.3, 0.2])  # whole runs move together, as seeds do
    matrix = np.clip(0.7 + seed_effect + rng.normal(0, 0.05, (40, 3)), 0, 1)
    one_seed = u.mean(matrix[:, :1])
    three = u.mean(matrix)
    assert three.stderr > 3 * one_seed.stderr  # the seeds, not the rows, decide the spread
    assert three.high - three.low > 0.5


def test_bootstrap_intervals_agree_with_an_independent_resampling():
    rng = np.random.default_rng(7)
    sample = rng.normal(50, 10, 60)
    ours = u.median(sample)
    draws = np.random.default_rng(123).choice(sample, size=(20000, sample.size), replace=True)
    medians = np.median(draws, axis=1)
    assert ours.low == pytest.approx(np.percentile(medians, 2.5), abs=1.0)
    assert ours.high == pytest.approx(np.percentile(medians, 97.5), abs=1.0)
    assert ours.method == "bootstrap over rows"
    before, after = rng.normal(60, 10, 50), rng.normal(60, 10, 50) - 3
    low, high = u.paired_bootstrap(before, after)
    index = np.random.default_rng(5).integers(0, 50, size=(20000, 50))
    means = (after[index] - before[index]).mean(axis=1)
    assert low == pytest.approx(np.percentile(means, 2.5), abs=0.4)
    assert high == pytest.approx(np.percentile(means, 97.5), abs=0.4)


def test_holm_on_a_textbook_example():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone 0.06.
    assert u.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert u.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 0.5 * 2 caps at 1; monotone after it
    assert u.holm([]) == []


def test_fishers_exact_test_on_seeds():
    assert u.fisher_worse(3, 3, 0, 3) == pytest.approx(1 / 20)  # one table of C(6, 3) as extreme
    assert u.fisher_worse(0, 3, 3, 3) == pytest.approx(1.0)


def _runs(rate_before, rate_after, seeds_before, seeds_after, rows=40, spread=0.0, seed=0):
    """0/1 matrices whose seeds shift the pass rate by up to ``spread``."""
    rng = np.random.default_rng(seed)

    def one(rate, count):
        shift = rng.uniform(-spread, spread, count)
        return (rng.random((rows, count)) < np.clip(rate + shift, 0, 1)).astype(float)

    return one(rate_before, len(seeds_before)), one(rate_after, len(seeds_after))


def _verdict(before, after, seeds_before, seeds_after, margin=0.05, kind="proportion"):
    d = u.compare("pass_rate", before, after, seeds_before, seeds_after, margin, kind=kind)
    u.decide([d])
    return d


def test_each_verdict_occurs():
    worse = _verdict(*_runs(0.9, 0.2, [1, 2, 3], [1, 2, 3]), [1, 2, 3], [1, 2, 3])
    assert worse.verdict == "worse" and worse.p_worse_adjusted < 0.05 and "worse by more than the margin" in worse.why
    better = _verdict(*_runs(0.2, 0.9, [1, 2, 3], [1, 2, 3]), [1, 2, 3], [1, 2, 3])
    assert better.verdict == "better"
    rng = np.random.default_rng(4)
    chrf = rng.normal(70, 10, (50, 3))
    steady = _verdict(chrf, chrf + rng.normal(0, 0.5, (50, 3)), [1, 2, 3], [1, 2, 3], margin=2.0, kind="mean")
    assert steady.verdict == "no detectable change" and steady.diff.stderr > 0 and steady.diff.low > -2.0
    noisy = _verdict(*_runs(0.7, 0.7, [1, 2, 3], [4, 5, 6], spread=0.3, seed=3), [1, 2, 3], [4, 5, 6])
    assert noisy.verdict == "inconclusive" and "seeds per run" in noisy.settle


def test_two_single_seed_runs_cannot_tell_a_change_from_seed_noise():
    # The measured case: the same recipe, seed 1 and seed 2, passed 85% and 52.5% of 40 rows.
    before = np.array([1.0] * 34 + [0.0] * 6)
    after = np.array([1.0] * 21 + [0.0] * 19)
    d = _verdict(before, after, [1], [2])
    assert d.verdict == "inconclusive"
    assert "cannot be told from seed noise" in d.why and "repeat:" in d.settle
    # Rows alone (McNemar on the same rows) would have called it significant: that is what it must not do.
    assert u.mcnemar(before, after)[2] < 0.01


def test_the_same_seed_on_both_sides_pairs_rows_and_says_seed_noise_is_not_measured():
    # A design choice, stated in every verdict: the same seed on both sides (no repeat:) is a paired
    # comparison of that seed's runs, so a change that only moves the trajectory, as another seed would, can
    # show as worse. docs/gate.md says so; repeat: is what measures seed noise.
    before = np.array([1.0] * 34 + [0.0] * 6)
    after = np.array([1.0] * 21 + [0.0] * 19)
    d = _verdict(before, after, [42], [42])
    assert d.verdict == "worse" and "seed's own noise is not in this interval" in d.why
    assert d.evidence["mcnemar"] == [{"passed_to_failed": 13, "failed_to_passed": 0, "p": pytest.approx(2 / 2 ** 13),
                                      "seed": 42}]
    identical = _verdict(before, before.copy(), [42], [42])
    assert identical.verdict == "no detectable change" and "identical" in identical.why


def test_lower_is_better_quantities_turn_the_tails():
    loss_before, loss_after = np.array([[1.0, 1.1, 0.9]]), np.array([[3.0, 3.2, 2.9]])
    rise = u.compare("final_loss", loss_before, loss_after, [1, 2, 3], [1, 2, 3], 0.1, higher_is_better=False)
    fall = u.compare("final_loss", loss_after, loss_before, [1, 2, 3], [1, 2, 3], 0.1, higher_is_better=False)
    u.decide([rise])
    u.decide([fall])
    assert (rise.verdict, fall.verdict) == ("worse", "better")


def test_holm_spans_every_difference_of_a_comparison():
    differences = [u.compare(f"q{i}", *_runs(0.9, 0.9 - 0.1 * i, [1, 2, 3], [1, 2, 3], seed=i), [1, 2, 3],
                             [1, 2, 3], 0.0, kind="proportion") for i in range(6)]
    raw = [d.p_worse for d in differences]
    u.decide(differences)
    assert [d.p_worse_adjusted for d in differences] == pytest.approx(u.holm(raw))
    worse = [d for d in differences if d.verdict == "worse"]
    assert worse and all("after Holm over 6" in d.why for d in worse)
    assert any(d.p_worse < 0.05 <= d.p_worse_adjusted for d in differences)  # the correction changed a verdict


def test_a_zero_spread_is_a_sign_test_not_certainty():
    # Two rows that both lost 5 points of chrF on the same seed: once "± 0, p = 0, WORSE"; a sign test over
    # two rows is p = 0.25.
    d = u.compare("mean_chrf", [[100.0], [90.0]], [[95.0], [85.0]], [1], [1], 2.0)
    u.decide([d])
    assert d.p_worse == 0.25 and d.verdict != "worse", (d.p_worse, d.verdict)
    assert "sign test" in d.why


def test_worse_is_never_said_beside_an_interval_that_reaches_the_margin():
    # One-sided p = 0.0478 (scipy's ttest_1samp), but the two-sided 95% interval is -23.9 to 1.92.
    d = u.compare("mean_chrf", [[100.0], [100.0], [100.0]], [[94.2], [89.0], [83.8]], [1], [1], 2.0)
    u.decide([d])
    assert d.p_worse_adjusted < 0.05 and d.diff.high > -2.0
    assert d.verdict == "inconclusive", (d.verdict, d.why)


def test_a_share_of_seeds_that_rose_is_no_detectable_change():
    # Fisher's test has no interval: HEAD passing on more seeds than BASE is not "inconclusive" (which
    # --fail-on-inconclusive would count).
    d = u.compare("case_pass_share", [[1.0, 1.0, 0.0]], [[1.0, 1.0, 1.0]], [1, 2, 3], [1, 2, 3], 0.0,
                  kind="proportion")
    d.diff.stderr = None  # as the seed quantities give it
    u.decide([d])
    assert d.verdict in ("no detectable change", "better"), (d.verdict, d.why)


def test_the_same_seeds_in_another_order_are_paired():
    before = [[0.9, 0.5, 0.7], [0.8, 0.4, 0.6]]
    after = [[0.6, 0.4, 0.8], [0.5, 0.3, 0.7]]  # seeds 3, 2, 1: each seed's values dropped by 0.1
    d = u.compare("mean_chrf", before, after, [1, 2, 3], [3, 2, 1], 0.0)
    assert "the same seeds on both sides" in d.design, d.design
    assert abs(d.diff.value + 0.1) < 1e-9
