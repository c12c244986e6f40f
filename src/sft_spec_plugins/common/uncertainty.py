"""How sure a number is: standard errors and 95% intervals for an eval set's aggregates, and comparisons
of two runs that tell a change from noise. A helper, not a plugin: eval sets, repeat and compare use it.

Two sources of noise, after Miller (2024), "Adding Error Bars to Evals", and inspect_ai's clustered
standard error: the rows (another sample of questions would score differently) and the seeds (another
training run would). A value is a matrix of rows x seeds (NaN where missing):

- one seed: closed forms over the rows: Student's t for a mean, Wilson's interval (scipy's ``binomtest``)
  for a share of rows; a median gets a percentile bootstrap (scipy's ``stats.bootstrap``). The interval
  then covers the rows only: seed noise is not measured, and the reports say so.
- several seeds (``repeat:``): the mean of the matrix with a two-way cluster-robust variance (Cameron,
  Gelbach and Miller 2011): rows and seeds are both clusters, ``V = V_rows + V_seeds - V_cells``, and the
  interval uses Student's t with Satterthwaite's degrees of freedom (``seeds - 1`` when the seeds dominate
  the spread, more when the rows do), so three seeds give wide but
  honest intervals.

A comparison is paired wherever the runs allow it (the same rows, by key; the same seeds) and decides one
of four verdicts against a practical margin: **worse** or **better** (by more than the margin, one-sided
t-test, Holm-corrected over every quantity of the comparison), **no detectable change** (the 95% interval's
worse end stays within the margin: getting worse by the margin is ruled out) or **inconclusive** (neither:
with how many seeds or rows would settle it).
Two single-seed runs with different seeds cannot tell a change from seed noise, whatever their rows say:
that is inconclusive, never significant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

LEVEL = 0.95
Verdict = Literal["worse", "better", "no detectable change", "inconclusive"]


@dataclass
class Estimate:
    """A value with its standard error and interval (``low``/``high`` at ``level``); None where the data
    cannot give one (one row, one value)."""

    value: float
    stderr: float | None = None
    low: float | None = None
    high: float | None = None
    rows: int = 0
    seeds: int = 1
    method: str = ""
    level: float = LEVEL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Estimate | None:
        if not isinstance(data, dict) or not _number(data.get("value")):
            return None
        known = {k: data[k] for k in ("value", "stderr", "low", "high", "rows", "seeds", "method", "level")
                 if k in data}
        for key in ("stderr", "low", "high"):
            if key in known and not _number(known[key]):
                known[key] = None
        return cls(**known)

    @property
    def seed_noise(self) -> bool:
        return self.seeds > 1

    def text(self, digits: int = 3) -> str:
        """``71.2 ± 3.1 (95%: 65.1-77.3)``: the value, its standard error, its interval."""
        shown = _fmt(self.value, digits)
        if self.stderr is None or self.low is None or self.high is None:
            return f"{shown} (no interval: {self.method or 'too few values'})"
        return (f"{shown} ± {_fmt(self.stderr, 2)} ({round(self.level * 100):g}%: {_fmt(self.low, digits)} to "
                f"{_fmt(self.high, digits)})")

    def counts(self) -> str:
        rows = f"{self.rows} row{'s' if self.rows != 1 else ''}"
        if self.seeds > 1:
            return f"{rows} x {self.seeds} seeds"
        return f"{rows}, 1 seed (seed noise not measured)"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float, digits: int) -> str:
    """``digits`` significant digits, without an exponent below ten million (3057, not 3.06e+03)."""
    if value is None or not math.isfinite(value):
        return str(value)
    if value == 0 or abs(value) < 1 or abs(value) >= 1e7:
        return f"{value:.{digits}g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def as_matrix(values: Any) -> np.ndarray:
    """A list of per-row values (one seed) or of per-row lists (one per seed) as a float rows x seeds array."""
    array = np.asarray(values, dtype=float)
    return array.reshape(-1, 1) if array.ndim == 1 else array


def _complete(matrix: np.ndarray) -> np.ndarray:
    """The rows measured on every seed (a metric a row did not produce is left out, not taken as zero)."""
    matrix = as_matrix(matrix)
    return matrix[~np.isnan(matrix).any(axis=1)] if matrix.size else matrix


def clustered_variance(matrix: np.ndarray) -> tuple[float, float]:
    """The variance of the grand mean of a complete rows x seeds matrix, clustered two ways (rows, seeds),
    with each cluster dimension's small-sample factor G/(G-1), and Satterthwaite's degrees of freedom for the
    sum of the two (between ``min(rows, seeds) - 1`` when seeds dominate and ``rows - 1`` when rows do). A
    matrix of one row or one seed is the one-way case: the variance of the other dimension's values."""
    rows, seeds = matrix.shape
    if rows == 1 or seeds == 1:
        values = matrix.ravel()
        return (float(values.var(ddof=1)) / values.size if values.size > 1 else 0.0), max(1, values.size - 1)
    n = matrix.size
    residual = matrix - matrix.mean()

    def one_way(sums: np.ndarray, groups: int) -> float:
        return float((sums ** 2).sum()) / n ** 2 * groups / (groups - 1)

    by_row = one_way(residual.sum(axis=1), rows)
    by_seed = one_way(residual.sum(axis=0), seeds)
    by_cell = one_way(residual.ravel(), n)
    variance = by_row + by_seed - by_cell
    if variance < 0:  # the two-way formula can go negative on small samples: the larger one-way variance
        variance = max(by_row, by_seed)
    denominator = by_row ** 2 / (rows - 1) + by_seed ** 2 / (seeds - 1)
    df = variance ** 2 / denominator if denominator else rows - 1
    return variance, float(min(max(df, min(rows, seeds) - 1), rows * seeds - 1))


def _t_interval(value: float, stderr: float, df: float, level: float) -> tuple[float, float]:
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, df)) * stderr
    return value - half, value + half


def _binary(matrix: np.ndarray) -> bool:
    return bool(matrix.size) and bool(np.isin(matrix, (0.0, 1.0)).all())


def mean(values: Any, level: float = LEVEL, binary_as_share: bool = True) -> Estimate:
    """The mean of a rows x seeds matrix: Student's t over rows for one seed, clustered for several. Scores
    that are all 0 or 1 (json_schema, stops) are a share of rows: Wilson's interval (see proportion), unless
    ``binary_as_share`` is off (differences, which only happen to be 0 or 1)."""
    matrix = _complete(values)
    rows, seeds = matrix.shape if matrix.size else (0, as_matrix(values).shape[1])
    if rows == 0:
        return Estimate(math.nan, rows=0, seeds=seeds, method="no values", level=level)
    if binary_as_share and _binary(matrix):
        return proportion(matrix, level)
    value = float(matrix.mean())
    if seeds == 1:
        if rows < 2:
            return Estimate(value, rows=rows, method="one value", level=level)
        stderr = float(matrix[:, 0].std(ddof=1)) / math.sqrt(rows)
        low, high = _t_interval(value, stderr, rows - 1, level)
        return Estimate(value, stderr, low, high, rows, 1, "t over rows", level)
    variance, df = clustered_variance(matrix)
    stderr = math.sqrt(variance)
    low, high = _t_interval(value, stderr, df, level)
    return Estimate(value, stderr, low, high, rows, seeds, "clustered by row and seed", level)


def _wilson(k: float, n: int, level: float) -> tuple[float, float]:
    from scipy import stats

    interval = stats.binomtest(int(round(k)), n).proportion_ci(confidence_level=level, method="wilson")
    return float(interval.low), float(interval.high)


def proportion(passed: Any, level: float = LEVEL) -> Estimate:
    """A share of rows (0/1 values): Wilson's interval for one seed. For several seeds the clustered interval,
    never narrower than Wilson's over the rows' mean passes (a matrix that passed everywhere is not certain:
    its rows are a sample too). The standard error shown is the interval's half-width over z."""
    from scipy import stats

    matrix = _complete(passed)
    rows, seeds = matrix.shape if matrix.size else (0, 1)
    if rows == 0:
        return Estimate(math.nan, rows=0, method="no rows", level=level)
    share = float(matrix.mean())
    low, high = _wilson(matrix.mean(axis=1).sum(), rows, level)
    method = "Wilson"
    if seeds > 1:
        variance, df = clustered_variance(matrix)
        c_low, c_high = _t_interval(share, math.sqrt(variance), df, level)
        low, high = min(low, max(0.0, c_low)), max(high, min(1.0, c_high))
        method = "clustered by row and seed, at least Wilson's over rows"
    z = float(stats.norm.ppf(0.5 + level / 2))
    return Estimate(share, (high - low) / (2 * z), low, high, rows, seeds, method, level)


def median(values: Any, level: float = LEVEL, resamples: int = 2000) -> Estimate:
    """The median of the rows (each row's mean over seeds): a percentile bootstrap over rows (scipy), seeded
    so the same values give the same interval. With several seeds, a two-stage bootstrap (seeds, then rows)
    so seed noise is in the interval too; scipy's bootstrap resamples one level only."""
    matrix = _complete(values)
    seeds = as_matrix(values).shape[1] if np.asarray(values).size else 1
    per_row = matrix.mean(axis=1) if matrix.size else np.array([])
    if per_row.size == 0:
        return Estimate(math.nan, rows=0, seeds=seeds, method="no values", level=level)
    value = float(np.median(per_row))
    if per_row.size < 2:
        return Estimate(value, rows=1, seeds=seeds, method="one value", level=level)
    rng = np.random.default_rng(0)
    if seeds > 1:
        draws = np.empty(resamples)
        for i in range(resamples):
            columns = matrix[:, rng.integers(0, seeds, seeds)]
            draws[i] = np.median(columns[rng.integers(0, per_row.size, per_row.size)].mean(axis=1))
        low, high = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
        return Estimate(value, float(draws.std(ddof=1)), float(low), float(high), int(per_row.size), seeds,
                        "bootstrap over seeds, then rows", level)
    if np.all(per_row == per_row[0]):
        return Estimate(value, 0.0, value, value, int(per_row.size), 1, "bootstrap over rows (all rows equal)", level)
    from scipy import stats

    result = stats.bootstrap((per_row,), np.median, confidence_level=level, n_resamples=resamples,
                             method="percentile", random_state=rng)
    return Estimate(value, float(result.standard_error), float(result.confidence_interval.low),
                    float(result.confidence_interval.high), int(per_row.size), 1, "bootstrap over rows", level)


def paired_bootstrap(before: Any, after: Any, level: float = LEVEL, resamples: int = 2000) -> tuple[float, float]:
    """scipy's paired bootstrap interval of mean(after - before) over rows (seeded)."""
    from scipy import stats

    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.size < 2 or np.all(a - b == (a - b)[0]):
        d = float((a - b).mean()) if b.size else math.nan
        return d, d
    result = stats.bootstrap((b, a), lambda x, y: np.mean(y - x), paired=True, confidence_level=level,
                             n_resamples=resamples, method="percentile", random_state=np.random.default_rng(0))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mcnemar(passed_before: Any, passed_after: Any) -> tuple[int, int, float]:
    """McNemar's exact test on paired pass/fail: (rows that went passed -> failed, failed -> passed,
    two-sided p-value from scipy's binomial test on the discordant rows)."""
    from scipy import stats

    b = np.asarray(passed_before, dtype=bool).ravel()
    a = np.asarray(passed_after, dtype=bool).ravel()
    lost, gained = int((b & ~a).sum()), int((~b & a).sum())
    if lost + gained == 0:
        return 0, 0, 1.0
    return lost, gained, float(stats.binomtest(lost, lost + gained, 0.5).pvalue)


def fisher_worse(passed_before: int, seeds_before: int, passed_after: int, seeds_after: int) -> float:
    """One-sided Fisher's exact test that a case passes on fewer seeds after than before (scipy)."""
    from scipy import stats

    table = [[passed_before, seeds_before - passed_before], [passed_after, seeds_after - passed_after]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), in the input order: the k-th smallest p-value is
    multiplied by (m - k + 1), made monotone and capped at 1. scipy has Benjamini-Hochberg
    (``false_discovery_control``) but not Holm; a gate wants the family-wise rate, so Holm."""
    pvalues = [1.0 if p is None or math.isnan(p) else p for p in pvalues]  # a missing p never hides another
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# -- comparing two runs ----------------------------------------------------------------------------------


@dataclass
class Difference:
    """HEAD minus BASE for one quantity, with what decides its verdict."""

    name: str
    before: Estimate
    after: Estimate
    diff: Estimate
    margin: float
    higher_is_better: bool
    design: str  # how the runs were paired, in words
    p_worse: float | None = None  # one-sided, worse by more than the margin (before correction)
    p_better: float | None = None
    p_worse_adjusted: float | None = None
    p_better_adjusted: float | None = None
    verdict: Verdict = "inconclusive"
    why: str = ""
    settle: str = ""  # for an inconclusive verdict: what would settle it
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["before"], out["after"], out["diff"] = self.before.to_dict(), self.after.to_dict(), self.diff.to_dict()
        return out


def _one_sided(improvement: float, stderr: float | None, df: float, margin: float) -> tuple[float | None, float | None]:
    """p-values of "worse by more than the margin" and "better by more than the margin"."""
    from scipy import stats

    if stderr is None or not math.isfinite(stderr) or not math.isfinite(improvement):
        return None, None
    if stderr == 0:  # every paired difference the same: no spread to test with, so a sign test over the
        # units (df + 1 of them): two rows that both dropped are p = 0.25, not certainty
        units = max(1, round(df) + 1)
        return (0.5 ** units if improvement < -margin else 1.0), (0.5 ** units if improvement > margin else 1.0)
    worse = float(stats.t.cdf((improvement + margin) / stderr, df))
    better = float(stats.t.sf((improvement - margin) / stderr, df))
    return worse, better


def _drop_empty_seeds(x: np.ndarray, y: np.ndarray, seeds_x: list, seeds_y: list, paired: bool):
    """Seeds whose every row lacks the value (a seed that diverged, a metric one side did not have) are left
    out, with their twin on the other side when the seeds are paired."""
    keep_x, keep_y = ~np.isnan(x).all(axis=0), ~np.isnan(y).all(axis=0)
    if paired:
        keep_x = keep_y = keep_x & keep_y
    return (x[:, keep_x], y[:, keep_y], [s for s, k in zip(seeds_x, keep_x, strict=True) if k],
            [s for s, k in zip(seeds_y, keep_y, strict=True) if k])


def _share_floor(seed_means: np.ndarray, rows: int) -> float:
    """The least variance a seed's share of ``rows`` passing rows is given: Agresti-Coull's p(1-p)/n, with
    two passes and two failures added, so a share of 1 on every seed is not taken as exact."""
    p = (float(seed_means.mean()) * rows + 2) / (rows + 4)
    return p * (1 - p) / rows


def _floor_paired_share(diff: Estimate, d: np.ndarray, df: float, level: float) -> None:
    """A paired difference of shares is never surer than Agresti-Caffo's interval allows (one pass and one
    failure added on each side of the flips): every row flipping on every seed still leaves the rows as a
    sample, and a zero spread must not read as certainty."""
    lost, gained, n = float((d < 0).sum()), float((d > 0).sum()), d.size
    floor = ((lost + 1) + (gained + 1) - (gained - lost) ** 2 / (n + 2)) / (n + 2) ** 2
    if diff.stderr is not None and diff.stderr ** 2 < floor:
        diff.stderr = math.sqrt(floor)
        diff.low, diff.high = _t_interval(diff.value, diff.stderr, df, level)
        diff.method += ", at least Agresti-Caffo's spread"


def compare(name: str, before: Any, after: Any, seeds_before: list[Any], seeds_after: list[Any], margin: float,
            higher_is_better: bool = True, kind: Literal["mean", "proportion"] = "mean",
            level: float = LEVEL) -> Difference:
    """BASE's and HEAD's rows x seeds matrices of one quantity, rows matched (same order), compared.

    - the same seeds on both sides: paired by row and seed, the differences' mean clustered two ways (one
      seed: paired over rows only, Student's t, and the seed's own noise is not measured);
    - other seeds: each seed's mean over the rows, compared across seeds (Welch's t); a side with one seed
      borrows the other side's seed variance; two single-seed runs cannot be compared (inconclusive).
    """
    x, y = as_matrix(before), as_matrix(after)
    seeds_before, seeds_after = list(seeds_before)[:x.shape[1]], list(seeds_after)[:y.shape[1]]
    if len(seeds_before) != x.shape[1] or len(seeds_after) != y.shape[1]:  # seeds unknown: numbered
        seeds_before, seeds_after = list(range(x.shape[1])), list(range(100, 100 + y.shape[1]))
    names_before, names_after = [str(s) for s in seeds_before], [str(s) for s in seeds_after]
    if names_before != names_after and sorted(names_before) == sorted(names_after) \
            and len(set(names_after)) == len(names_after):  # the same seeds listed in another order: paired
        order = [names_after.index(name) for name in names_before]
        y, seeds_after = y[:, order], [seeds_after[i] for i in order]
        names_after = names_before
    same_seeds = names_before == names_after
    x, y, seeds_before, seeds_after = _drop_empty_seeds(x, y, seeds_before, seeds_after, same_seeds)
    estimate = proportion if kind == "proportion" else mean
    est_before, est_after = estimate(x, level), estimate(y, level)
    sign = 1.0 if higher_is_better else -1.0
    rows = x.shape[0]
    make = {"name": name, "before": est_before, "after": est_after, "margin": margin,
            "higher_is_better": higher_is_better}
    if not x.size or not y.size or not x.shape[1] or not y.shape[1]:
        return Difference(diff=Estimate(math.nan, method="no values"), design="no values on one side",
                          why="one run has no value of this quantity", **make)
    evidence: dict[str, Any] = {}
    if same_seeds:
        keep = ~(np.isnan(x).any(axis=1) | np.isnan(y).any(axis=1))
        d = (y - x)[keep]
        if d.size == 0:
            return Difference(diff=Estimate(math.nan, method="no values in common"), design="no rows in common",
                              why="no row has this value in both runs", **make)
        if np.all(d == 0):
            return Difference(diff=Estimate(0.0, 0.0, 0.0, 0.0, int(d.shape[0]), d.shape[1], "identical", level),
                              design="same rows and seeds", verdict="no detectable change", p_worse=1.0,
                              p_better=1.0, why="identical in both runs, row by row and seed by seed", **make)
        diff = mean(d, level, binary_as_share=False)
        if d.shape[1] == 1:
            design = f"paired over {d.shape[0]} rows, one seed ({seeds_before[0]}) on both sides"
            df: float = max(1, d.shape[0] - 1)
            if kind == "mean" and d.shape[0] > 1:  # scipy's paired bootstrap, beside Student's t
                evidence["paired_bootstrap"] = paired_bootstrap(x[keep][:, 0], y[keep][:, 0], level)
        else:
            design = (f"paired over {d.shape[0]} rows x {d.shape[1]} seeds (the same seeds on both sides)"
                      if d.shape[0] > 1 else f"paired by seed ({d.shape[1]} seeds, the same on both sides)")
            df = clustered_variance(d)[1]
        if kind == "proportion":  # McNemar's exact test on the rows that flipped, seed by seed
            evidence["mcnemar"] = [dict(zip(("passed_to_failed", "failed_to_passed", "p"),
                                            mcnemar(x[keep][:, j] > 0.5, y[keep][:, j] > 0.5), strict=True),
                                        seed=seeds_before[j]) for j in range(d.shape[1])]
            _floor_paired_share(diff, d, df, level)
    else:
        means_x, means_y = np.nanmean(x, axis=0), np.nanmean(y, axis=0)
        sx, sy = len(means_x), len(means_y)
        value = float(means_y.mean() - means_x.mean())
        design = (f"seeds not paired ({', '.join(map(str, seeds_before))} against "
                  f"{', '.join(map(str, seeds_after))}): " + (f"each seed's mean over {rows} rows" if rows > 1
                                                              else "each seed's value"))
        if sx < 2 and sy < 2:
            diff = Estimate(value, rows=rows, seeds=1, method="two single-seed runs", level=level)
            return Difference(diff=diff, design=design, **make, why=(
                f"one seed on each side, and not the same one ({seeds_before[0]} against {seeds_after[0]}): a "
                "change cannot be told from seed noise, however many rows moved"),
                settle="run both sides with `repeat: {seeds: [1, 2, 3]}` (the same seeds pair the runs)")
        var_x = float(means_x.var(ddof=1)) if sx > 1 else None
        var_y = float(means_y.var(ddof=1)) if sy > 1 else None
        if kind == "proportion":  # seeds that all passed the same share are not certain: rows are a sample
            var_x, var_y = (None if v is None else max(v, _share_floor(m, rows)) for v, m in ((var_x, means_x),
                                                                                               (var_y, means_y)))
        if var_x is None or var_y is None:  # one side has one seed: it borrows the other side's seed variance
            pooled = var_x if var_x is not None else var_y
            stderr = math.sqrt(pooled * (1 / sx + 1 / sy))
            df = (sx if var_x is not None else sy) - 1
            design += "; the single seed's variance is taken from the other side"
        else:
            stderr = math.sqrt(var_x / sx + var_y / sy)
            denominator = (var_x / sx) ** 2 / (sx - 1) + (var_y / sy) ** 2 / (sy - 1)
            df = stderr ** 4 / denominator if denominator else sx + sy - 2  # Welch-Satterthwaite
        low, high = (value, value) if stderr == 0 else _t_interval(value, stderr, df, level)
        diff = Estimate(value, stderr, low, high, rows, sx + sy, "Welch's t over seed means", level)
    p_worse, p_better = _one_sided(sign * diff.value, diff.stderr, df, margin)
    if kind == "proportion" and diff.low is not None:  # a difference of shares lies in [-1, 1]
        diff.low, diff.high = max(-1.0, diff.low), min(1.0, diff.high)
    result = Difference(diff=diff, design=design, p_worse=p_worse, p_better=p_better, **make)
    result.evidence.update(df=round(float(df), 2), **evidence)
    return result


def decide(differences: list[Difference], alpha: float = 0.05) -> None:
    """Holm over every tested difference of the comparison, then each one's verdict: worse or better by more
    than its margin (adjusted p below alpha), no detectable change (the interval's worse end stays within
    the margin: a regression of the margin's size is ruled out), else inconclusive, with what would settle
    it."""
    tested = [d for d in differences if d.p_worse is not None and d.diff.method != "identical"]
    tested_ids = {id(d) for d in tested}
    for adjusted, d in zip(holm([d.p_worse for d in tested]), tested, strict=True):
        d.p_worse_adjusted = adjusted
    for adjusted, d in zip(holm([d.p_better for d in tested]), tested, strict=True):
        d.p_better_adjusted = adjusted
    for d in differences:
        if id(d) not in tested_ids:  # decided without a test (identical, judged on a point) or with no way to test
            if d.verdict == "inconclusive" and not d.why:
                d.why = f"no interval ({d.diff.method or 'too few values'})"
                d.settle = d.settle or "`repeat: {seeds: [1, 2, 3]}` on both sides gives one"
            continue
        improvement = (1 if d.higher_is_better else -1) * d.diff.value
        worse_end = None if d.diff.low is None else (d.diff.low if d.higher_is_better else -d.diff.high)
        caveat = "; one seed on both sides: the seed's own noise is not in this interval" \
            if "one seed" in d.design else ""
        caveat += "; every paired difference the same: a sign test" if d.diff.stderr == 0 else ""
        best_end = None if d.diff.low is None else (d.diff.high if d.higher_is_better else -d.diff.low)
        # The verdict never contradicts the interval shown: "worse" needs the whole 95% interval past the margin.
        if d.p_worse_adjusted < alpha and (best_end is None or best_end < -d.margin):
            d.verdict = "worse"
            d.why = (f"worse by more than the margin {d.margin:.3g} (p = {d.p_worse_adjusted:.3g} after Holm over "
                     f"{len(tested)}){caveat}")
        elif d.p_better_adjusted is not None and d.p_better_adjusted < alpha and (
                worse_end is None or worse_end > d.margin):
            d.verdict = "better"
            d.why = (f"better by more than the margin {d.margin:.3g} (p = {d.p_better_adjusted:.3g} after Holm over "
                     f"{len(tested)}){caveat}")
        elif worse_end is not None and worse_end > -d.margin:
            d.verdict = "no detectable change"
            d.why = (f"the {round(d.diff.level * 100):g}% interval rules out getting worse by the margin "
                     f"{d.margin:.3g}{caveat}")
        else:
            d.verdict = "inconclusive"
            if d.diff.stderr is None and improvement >= 0:  # Fisher's on seeds passed, and HEAD is no worse
                d.verdict = "no detectable change"
                d.why = f"HEAD did no worse (p = {d.p_worse_adjusted:.3g} for worse, after Holm over {len(tested)})"
            elif d.diff.stderr is None:  # a test without an interval (Fisher's, on seeds passed)
                d.why = f"p = {d.p_worse_adjusted:.3g} after Holm over {len(tested)}: too few seeds to tell"
                d.settle = "more seeds (repeat:)"
            else:
                d.why = f"the interval is too wide to rule out getting worse by the margin {d.margin:.3g}{caveat}"
                d.settle = _settle(d, improvement)


def _settle(d: Difference, improvement: float) -> str:
    """How many seeds (or rows) would make the interval narrow enough for a verdict: the standard error
    shrinks with the square root of the count that dominates it."""
    if not d.diff.stderr or d.diff.low is None or not all(map(math.isfinite, (d.diff.low, d.diff.high,
                                                                                improvement))):
        return "more seeds (repeat:) and rows"
    half = (d.diff.high - d.diff.low) / 2
    room = abs(improvement + d.margin)  # the distance from the estimate to the margin: the half-width a verdict needs
    if room <= 0:
        return "the change is about the size of the margin: no count settles it; choose the margin on purpose"
    factor = (half / room) ** 2
    rows = max(d.diff.rows + 1, math.ceil(d.diff.rows * factor))
    if d.diff.seeds > 1 and "seed" in d.diff.method:
        seeds = d.diff.seeds if "Welch" not in d.diff.method else d.diff.seeds // 2
        more_seeds = max(seeds + 1, math.ceil(seeds * factor))
        if d.diff.rows <= 1:  # one value per seed (a final loss): only seeds add information
            return f"about {more_seeds} seeds per run (repeat:) would settle it"
        return (f"about {more_seeds} seeds per run (repeat:), or {rows} rows, would settle it (whichever dominates "
                "the spread)")
    return f"about {rows} rows, and `repeat:` with 3 seeds or more to measure seed noise, would settle it"
