"""The statistics of a cohort report: a summary per figure and cohort, and the test between two cohorts.

- Numbers: median and IQR; two independent cohorts: Mann-Whitney U with the rank-biserial correlation; two runs over
  the same cases (paired): Wilcoxon signed-rank with the matched-pairs rank-biserial correlation.
- Hit or miss (the pointing game): the hit rate with its exact (Clopper-Pearson) 95 % interval; two independent
  cohorts: Fisher's exact test; paired: the exact McNemar test (a binomial test on the discordant pairs). The effect
  size is the difference of the hit rates.
"""
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import stats

BINARY = ('pointing_game',)


def summary(values: Sequence[float], binary: bool) -> dict:
    v = np.asarray(values, float)
    if binary:
        hits = int(v.sum())
        ci = stats.binomtest(hits, len(v)).proportion_ci(0.95, method='exact')
        return {'n': len(v), 'hits': hits, 'rate': hits / len(v), 'ci_low': float(ci.low), 'ci_high': float(ci.high)}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {'n': len(v), 'median': float(med), 'q1': float(q1), 'q3': float(q3)}


def rank_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided Mann-Whitney U; effect size: rank-biserial correlation 2U/(n_a n_b) - 1 (> 0: A tends higher)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(np.concatenate([a, b])) == 0:
        return {'u': len(a) * len(b) / 2, 'p': 1.0, 'effect_size': 0.0}
    r = stats.mannwhitneyu(a, b, alternative='two-sided')
    return {'u': float(r.statistic), 'p': float(r.pvalue), 'effect_size': 2 * float(r.statistic) / (len(a) * len(b)) - 1}


def signed_rank_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank on the pairs' differences (zero differences dropped, as Wilcoxon's);
    effect size: matched-pairs rank-biserial correlation (W+ - W-) / (W+ + W-) (> 0: A tends higher)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[d != 0]
    if d.size == 0:
        return {'p': 1.0, 'effect_size': 0.0}
    ranks = stats.rankdata(np.abs(d))
    effect = float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())
    return {'p': float(stats.wilcoxon(d).pvalue), 'effect_size': effect}


def hit_test(a: Sequence[float], b: Sequence[float], paired: bool) -> dict:
    """Fisher's exact test on the 2x2 table of hits and misses, or for pairs the exact McNemar test; effect size:
    hit rate of A minus that of B."""
    a, b = np.asarray(a, int), np.asarray(b, int)
    effect = float(a.mean() - b.mean())
    if paired:
        only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b).pvalue)
    else:
        p = float(stats.fisher_exact([[a.sum(), len(a) - a.sum()], [b.sum(), len(b) - b.sum()]]).pvalue)
    return {'p': p, 'effect_size': effect}


TESTS = {(False, False): 'Mann-Whitney U', (False, True): 'Wilcoxon signed-rank',
         (True, False): 'Fisher exact', (True, True): 'exact McNemar'}


def compare(figure: str, a: Dict[str, float], b: Dict[str, float], paired: bool) -> Optional[dict]:
    """The test between two cohorts' values of one figure (case -> value), or None without values to compare.
    Paired: the cases defined in both."""
    binary = figure in BINARY
    if paired:
        cases = sorted(set(a) & set(b))
        x, y = [a[c] for c in cases], [b[c] for c in cases]
    else:
        x, y = list(a.values()), list(b.values())
    if not x or not y:
        return None
    if binary:
        r = hit_test(x, y, paired)
    else:
        r = signed_rank_test(x, y) if paired else rank_test(x, y)
    return {'test': TESTS[(binary, paired)], 'cases': [len(x), len(y)], **r}
