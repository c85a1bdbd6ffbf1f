"""The statistics behind an ablation table's verdicts (numpy and scipy.stats; no jax).

A table runs every member once per seed. Two members' runs with the same seed are PAIRED:

- the same data order: the training stream is the packed rows shuffled with `train.seed`
  (`moe/data/pipeline.py`), so members with the same seed, batch size and sequence length read
  the same batches in the same order, and every run is evaluated on the same validation rows;
- the same non-MoE initialisation: the trainer splits `jax.random.PRNGKey(train.seed)` into the
  init and training keys (`moe/train/trainer.py`, `_initial_state`), and Flax derives each
  parameter's key from the init key and the parameter's module path, not from the other
  parameters. A different MoE config (top-K, expert count or width, capacity, router type,
  shared experts, or a dense MLP instead of the MoE) therefore leaves the embedding, attention,
  norms and output projection bit-identical for the same seed, and members that differ only in
  settings without parameters (K, capacity, balancing, z-loss) start from the very same weights
  (tests/sweep/test_pairing.py checks this). Members that change a non-MoE shape (d_model, a
  dense d_ff) or load `train.init_from` share the seed's key, not the values.

So the comparison of two members uses the per-seed differences d_s = (b_s - a_s or a_s - b_s,
signed so that d > 0 is the claimed direction) over the seeds both completed: the seed's shared
data order and initialisation cancel out, which a comparison of unpaired means would not do.

The tests (each one-sided at ALPHA = 0.05 before correction; `Test` holds the result):

- `paired`: one-sample t-test of the d_s against 0 (H1: mean d > 0); the estimate is the mean
  gap with a two-sided 95% t-interval.
- `trend`: per seed, the least-squares slope of the signed metric over the members' positions in
  the claimed order (a seed-blocked linear contrast), then the t-test of those slopes against 0.
- `no_worse`: non-inferiority with a margin m > 0: the t-test of d_s + m against 0 (H1: mean
  d > -m, "a is worse than b by less than m").
- `stability`: an exact test of paired divergence counts (McNemar's exact test: the binomial
  test of the seeds where exactly one of the two members diverged, p = 1/2 under H0).

Holm's step-down correction (`holm`) runs over the tests of one table's published claims (the
mechanism checks form a family of their own); the reverse-direction p-values are corrected the
same way. `mde` and `stability_mde` give the minimum detectable effect: the smallest true effect
the test detects with probability POWER = 0.8 at one-sided ALPHA (before Holm: with more than one
claim the corrected test needs a larger effect, so this is a lower bound). `verdict` turns a
corrected test into "holds", "reverses", "not testable at this scale" or "not resolved".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sst

ALPHA = 0.05
POWER = 0.8
CONFIDENCE = 0.95

HOLDS = "holds"
REVERSES = "reverses"
NOT_TESTABLE = "not testable at this scale"
NOT_RESOLVED = "not resolved"
NO_DATA = "n/a"
VERDICTS = (HOLDS, REVERSES, NOT_TESTABLE, NOT_RESOLVED, NO_DATA)


@dataclasses.dataclass(frozen=True)
class Test:
  """One test of a claim (or of one adjacent pair of an ordering).

  estimate: the mean gap in the claimed direction (paired, no_worse), the mean slope per step
  (trend) or the difference of the divergence rates (stability); low/high its two-sided 95%
  t-interval (None where there is none); p / p_reverse: one-sided p-values for the claimed /
  the opposite direction (None: no test possible); mde: minimum detectable effect in the units of
  `estimate` (math.inf: no effect is detectable with these seeds); target: the effect the test
  would have to detect (the published effect; for no_worse, margin + published gap), or None.
  """
  n: int
  estimate: float | None
  low: float | None
  high: float | None
  sd: float | None
  p: float | None
  p_reverse: float | None
  mde: float | None
  target: float | None
  detail: str = ""


def _t_parts(x: np.ndarray) -> tuple[float, float, float | None, float | None]:
  """(mean, sample sd, interval low, interval high) of x; no sd / interval for one value."""
  n = x.size
  mean = float(x.mean())
  if n < 2:
    return mean, None, None, None
  sd = float(x.std(ddof=1))
  half = float(sst.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
  return mean, sd, mean - half, mean + half


def _t_pvalues(mean: float, sd: float, n: int) -> tuple[float, float]:
  """One-sided p-values (H1: mean > 0, H1: mean < 0) of the one-sample t-test. A zero sd (every
  seed gives the same value) is a certain sign: p 0 for that sign, 1 for the other, 1 and 1
  for an exact zero."""
  if sd == 0.0:
    return (0.0 if mean > 0 else 1.0), (0.0 if mean < 0 else 1.0)
  t = mean / (sd / math.sqrt(n))
  return float(sst.t.sf(t, n - 1)), float(sst.t.cdf(t, n - 1))


def mde(sd: float | None, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
  """Minimum detectable effect of a one-sided one-sample t-test: the true mean delta at which
  P(reject H0: mean <= 0) = power, from the NONCENTRAL t distribution (exact for normal
  differences): t ~ nct(df = n - 1, nc = delta sqrt(n) / sd), rejected when t > t_{1-alpha}.
  math.inf for fewer than 2 seeds (no test), 0 for a zero sd."""
  if n < 2 or sd is None:
    return math.inf
  if sd == 0.0:
    return 0.0
  crit = float(sst.t.ppf(1 - alpha, n - 1))
  f = lambda nc: float(sst.nct.sf(crit, n - 1, nc)) - power  # noqa: E731
  hi = 1.0
  while f(hi) < 0:
    hi *= 2
  return float(optimize.brentq(f, 0.0, hi, xtol=1e-10)) * sd / math.sqrt(n)


def seeds_needed(sd: float | None, effect: float, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = 1000) -> int | None:
  """The smallest seed count whose `mde` at this paired sd is <= effect (None past max_seeds
  or without an sd): how many seeds a table needs to test a published effect."""
  if sd is None or effect <= 0:
    return None
  for n in range(2, max_seeds + 1):
    if mde(sd, n, alpha, power) <= effect:
      return n
  return None


def paired(d: Sequence[float], effect: float | None = None) -> Test:
  """Paired comparison: d are the per-seed differences, signed so d > 0 is the claimed
  direction. One-sample t-test of mean d against 0 (one-sided p both ways), the mean gap with its
  two-sided 95% t-interval, and the MDE (`mde`) from the sd of the d. target = effect."""
  x = np.asarray(d, np.float64)
  if x.size == 0:
    return Test(0, None, None, None, None, None, None, None, effect)
  mean, sd, low, high = _t_parts(x)
  p, p_rev = (None, None) if sd is None else _t_pvalues(mean, sd, x.size)
  return Test(x.size, mean, low, high, sd, p, p_rev, mde(sd, x.size), effect)


def slopes(q_SK: np.ndarray) -> np.ndarray:
  """Per seed (row), the least-squares slope of q over the positions of the K members in the
  claimed order, best first, counted from the worst: position K-1-j for column j, so a positive
  slope means q rises toward the claimed best. In q's units per member step."""
  q = np.asarray(q_SK, np.float64)
  pos = np.arange(q.shape[1] - 1, -1, -1, dtype=np.float64)
  c = pos - pos.mean()
  return q @ c / float(c @ c)


def trend(q_SK: np.ndarray, effect: float | None = None) -> Test:
  """Monotone trend, seed-blocked: q_SK[s, j] is seed s's metric signed so higher is better,
  for the members in the claimed order (best first). Each seed gives one slope (`slopes`); the
  slopes are t-tested against 0 (one-sided). Blocking by seed removes the seed's shared data
  order and initialisation like a paired difference does; the slope keeps the effect in metric
  units per step, so it has an interval and an MDE comparable with a published effect (Page's
  rank test would have neither, and with 3 to 5 seeds ranks discard most of the information).
  It tests a tendency along the order, not every step: a claim about every adjacent pair is an
  `order` claim. effect: the published mean change per member step."""
  q = np.asarray(q_SK, np.float64)
  if q.ndim != 2 or q.shape[1] < 2:
    raise ValueError(f"trend needs [seeds, members >= 2] values, got shape {q.shape}")
  t = paired(slopes(q) if q.shape[0] else [], effect)
  return dataclasses.replace(t, detail=f"slope per member step, {q.shape[1]} members")


def no_worse(d: Sequence[float], margin: float, effect: float | None = None) -> Test:
  """Non-inferiority: d are per-seed differences (d > 0: a better than b). H0: mean d <= -margin
  (a worse by the margin or more), H1: mean d > -margin, by the one-sided t-test of d + margin;
  p_reverse tests mean d < -margin (a worse by more than the margin). The estimate and interval
  are those of d itself. The test must detect a distance margin + (published gap, 0 if none)
  from the boundary; that is the target compared with the MDE."""
  if not margin > 0:
    raise ValueError(f"no_worse needs a margin > 0, got {margin!r}")
  x = np.asarray(d, np.float64)
  t = paired(x + margin)
  if t.n == 0:
    return dataclasses.replace(t, target=margin + (effect or 0.0))
  return dataclasses.replace(
      t, estimate=t.estimate - margin, low=None if t.low is None else t.low - margin,
      high=None if t.high is None else t.high - margin, target=margin + (effect or 0.0),
      detail=f"margin {margin:g}")


def _binom_sf(k: int, n: int, p: float = 0.5) -> float:
  """P(X >= k) for X ~ Binomial(n, p)."""
  return float(sst.binom.sf(k - 1, n, p))


def stability(stable_a: Sequence[bool], stable_b: Sequence[bool],
              effect: float | None = None, alpha: float = ALPHA) -> Test:
  """Stability, claimed: a diverges less often than b. stable_a / stable_b: per shared seed,
  whether the run finished without diverging. McNemar's exact test (the seeds are paired): among
  the seeds where exactly one member diverged, the number where b diverged is Binomial(discordant,
  1/2) under H0; p is its upper tail, p_reverse its lower tail. Only discordant seeds carry
  information, so the estimate (b's divergence rate minus a's) has no interval. effect: the
  published difference of the divergence rates (0 to 1)."""
  a = np.asarray(stable_a, bool)
  b = np.asarray(stable_b, bool)
  if a.shape != b.shape:
    raise ValueError(f"stability needs paired outcomes, got {a.shape} and {b.shape}")
  n = a.size
  if n == 0:
    return Test(0, None, None, None, None, None, None, None, effect)
  ab = int(np.sum(a & ~b))  # b diverged, a did not
  ba = int(np.sum(~a & b))
  disc = ab + ba
  p = _binom_sf(ab, disc) if disc else 1.0
  p_rev = float(sst.binom.cdf(ab, disc, 0.5)) if disc else 1.0
  return Test(n, (ab - ba) / n, None, None, None, p, p_rev, stability_mde(n, alpha), effect,
              detail=f"diverged: {int(np.sum(~a))}/{n} vs {int(np.sum(~b))}/{n}")


def stability_mde(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
  """Minimum detectable difference of divergence rates for `stability` with n paired seeds, in
  the case most favourable to detection (the stable member never diverges, so every seed where
  the other one diverges is discordant in the claimed direction): the rate r at which
  P(Binomial(n, r) >= k) = power, where k is the fewest one-sided discordant seeds significant
  at alpha (1/2^k <= alpha: 5 at 0.05). math.inf when n < k: no difference is detectable."""
  k = math.ceil(math.log(alpha) / math.log(0.5) - 1e-12)
  if n < k:
    return math.inf
  f = lambda r: _binom_sf(k, n, r) - power  # noqa: E731
  return float(optimize.brentq(f, 1e-9, 1.0, xtol=1e-10)) if f(1.0) >= 0 else math.inf


def holm(p: Sequence[float | None]) -> list[float | None]:
  """Holm's step-down adjusted p-values (family-wise error <= alpha when rejecting adjusted
  p <= alpha): sort the m p-values ascending, adjusted_i = max over j <= i of min(1, (m - j + 1)
  p_(j)). None entries (no test) are left out of the family and stay None."""
  idx = [i for i, x in enumerate(p) if x is not None]
  m = len(idx)
  out: list[float | None] = [None] * len(p)
  running = 0.0
  for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
    running = max(running, min(1.0, (m - rank) * float(p[i])))
    out[i] = running
  return out


def verdict(t: Test, p_adj: float | None, p_reverse_adj: float | None,
            alpha: float = ALPHA) -> str:
  """holds: significant (Holm-adjusted p <= alpha) in the claimed direction; reverses:
  significant the other way; not testable at this scale: neither, and the target (published
  effect) is below the minimum detectable effect; not resolved: otherwise (including every claim
  without a published effect, which is testable only as a direction); n/a: no paired data."""
  if t.n == 0:
    return NO_DATA
  if p_adj is not None and p_adj <= alpha:
    return HOLDS
  if p_reverse_adj is not None and p_reverse_adj <= alpha:
    return REVERSES
  if t.target is not None and (t.mde is None or t.target < t.mde):
    return NOT_TESTABLE
  return NOT_RESOLVED


def combine(verdicts: Sequence[str]) -> str:
  """A claim's verdict from its tests' (an ordering's adjacent pairs): holds if every test holds,
  reverses if any reverses, not testable if every test that does not hold is not testable, n/a
  if no test has data, not resolved otherwise."""
  vs = list(verdicts)
  if not vs or all(v == NO_DATA for v in vs):
    return NO_DATA
  if REVERSES in vs:
    return REVERSES
  if all(v == HOLDS for v in vs):
    return HOLDS
  if all(v in (HOLDS, NOT_TESTABLE) for v in vs):
    return NOT_TESTABLE
  return NOT_RESOLVED
