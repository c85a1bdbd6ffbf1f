"""The ablation statistics on synthetic results with known answers (numpy; no jax, no training).

Tables are built as `moe.sweep.report.collect` would load them (members with per-seed runs) and
judged by `moe.sweep.verdicts.evaluate`, so the tests cover the pairing by seed, the tests,
Holm and the verdicts together; the building blocks are checked against closed forms.
"""

import math

import numpy as np
import pytest

from moe.sweep import stats, verdicts

METRIC = "eval_cross_entropy"  # lower is better


def member(name, values, statuses=None):
  """A member with one completed run per seed (value None: the run has no value)."""
  statuses = statuses or ["completed"] * len(values)
  return {"name": name, "overrides": {},
          "runs": [{"seed": s, "status": st, "values": {METRIC: v}, "extra": {}}
                   for s, (v, st) in enumerate(zip(values, statuses))]}


def claim(order, **kw):
  return {"claim": "c", "source": "s", "order": list(order), **kw}


def judge(members, claims):
  return verdicts.evaluate(members, claims, METRIC, higher_is_better=False)


def two_members(gap_per_seed, base=None):
  """a better than b by gap_per_seed[s] on seed s (lower CE), around a seed-dependent base."""
  base = base if base is not None else np.linspace(1.40, 1.48, len(gap_per_seed))
  b = np.asarray(base, float)
  return [member("a", list(b - np.asarray(gap_per_seed))), member("b", list(b))]


# ----------------------------------------------------------------------------- building blocks


def test_t_interval_and_p_against_closed_forms():
  # d = 1, 2, 3: mean 2, sd 1, df 2. For df = 2 the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so
  # t_{0.975} solves t / sqrt(2 + t^2) = 0.95: t^2 = 2 * 0.9025 / 0.0975.
  t975 = math.sqrt(2 * 0.9025 / 0.0975)
  half = t975 * 1.0 / math.sqrt(3)
  t = 2.0 / (1.0 / math.sqrt(3))
  p = 0.5 - t / (2 * math.sqrt(2 + t * t))
  got = stats.paired([1.0, 2.0, 3.0])
  assert got.n == 3 and got.estimate == pytest.approx(2.0) and got.sd == pytest.approx(1.0)
  assert got.low == pytest.approx(2.0 - half, rel=1e-9)
  assert got.high == pytest.approx(2.0 + half, rel=1e-9)
  assert got.p == pytest.approx(p, rel=1e-9) and got.p_reverse == pytest.approx(1 - p, rel=1e-9)


def test_holm_on_hand_computed_p_values():
  # m = 4 (None is no test): sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, then
  # max(1*0.04, 0.06) (adjusted values never decrease).
  assert stats.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx(
      [0.03, 0.06, 0.06, None, 0.02])
  assert stats.holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1
  assert stats.holm([]) == [] and stats.holm([None]) == [None]


def test_mde_is_the_effect_with_80_percent_power():
  """At the true gap mde(sd, n) the one-sided t-test rejects 80% of the time (simulated)."""
  sd, n = 0.02, 5
  delta = stats.mde(sd, n)
  rng = np.random.default_rng(1)
  d = delta + sd * rng.standard_normal((20000, n))
  t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
  from scipy import stats as sst
  power = float(np.mean(t > sst.t.ppf(0.95, n - 1)))
  assert power == pytest.approx(0.8, abs=0.015)
  # Large n: the normal approximation (z_0.95 + z_0.8) sd / sqrt(n).
  assert stats.mde(1.0, 400) == pytest.approx((1.644854 + 0.841621) / 20, rel=0.01)
  assert stats.mde(1.0, 1) == math.inf and stats.mde(0.0, 3) == 0.0
  assert stats.mde(1.0, 3) > stats.mde(1.0, 5) > stats.mde(1.0, 10)


def test_seeds_needed_is_the_first_seed_count_reaching_the_effect():
  n = stats.seeds_needed(0.01, 0.004)
  assert stats.mde(0.01, n) <= 0.004 < stats.mde(0.01, n - 1)
  assert stats.seeds_needed(None, 0.004) is None


def test_stability_mde_closed_form():
  # k = 5 discordant seeds are needed (1/2^5 <= 0.05 < 1/2^4); with n = 5 all must diverge:
  # r^5 = 0.8.
  assert stats.stability_mde(4) == math.inf
  assert stats.stability_mde(5) == pytest.approx(0.8 ** 0.2, rel=1e-6)
  assert stats.stability_mde(20) < stats.stability_mde(10) < 1


def test_slopes_hand_computed():
  q = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 0.0, 2.0]])  # best first
  np.testing.assert_allclose(stats.slopes(q), [1.0, -1.0, 0.0])


# ----------------------------------------------------------------------------- order claims


def test_real_effect_well_above_the_mde_holds():
  rng = np.random.default_rng(0)
  gaps = 0.05 + 0.005 * rng.standard_normal(5)
  (c,) = judge(two_members(gaps), [claim(["a", "b"], effect=0.03)])
  (t,) = c["tests"]
  assert t["test"].mde < 0.03 < t["test"].estimate
  assert t["test"].low < 0.05 < t["test"].high
  assert t["verdict"] == c["verdict"] == stats.HOLDS


def test_reversed_effect_reverses():
  rng = np.random.default_rng(0)
  (c,) = judge(two_members(-0.05 + 0.005 * rng.standard_normal(5)), [claim(["a", "b"])])
  assert c["verdict"] == stats.REVERSES
  assert c["tests"][0]["test"].estimate == pytest.approx(-0.05, abs=0.01)


def test_published_effect_below_the_mde_is_not_testable():
  # ST-MoE's 0.004 nats against a paired sd near 0.01 with 3 seeds: MDE ~ 0.023.
  gaps = [0.01, -0.01, 0.002]
  (c,) = judge(two_members(gaps), [claim(["a", "b"], effect=0.004)])
  t = c["tests"][0]
  assert t["test"].target == 0.004 < t["test"].mde
  assert c["verdict"] == stats.NOT_TESTABLE
  # The same data without a published effect is a direction only: not resolved.
  (c,) = judge(two_members(gaps), [claim(["a", "b"])])
  assert c["verdict"] == stats.NOT_RESOLVED
  # With a published effect above the MDE, a non-significant result is not resolved.
  (c,) = judge(two_members(gaps), [claim(["a", "b"], effect=0.2)])
  assert c["verdict"] == stats.NOT_RESOLVED


def test_no_effect_holds_at_about_the_nominal_rate():
  """2000 tables of 5 seeds with no true gap: the one-sided test at 0.05 calls 'holds' about 5%
  of the time (binomial sd of the count ~ 9.7; 4 sds either side), 'reverses' as often."""
  rng = np.random.default_rng(7)
  counts = {v: 0 for v in stats.VERDICTS}
  for _ in range(2000):
    base = 1.4 + 0.05 * rng.standard_normal(5)  # a seed effect shared by both members
    a = base + 0.01 * rng.standard_normal(5)
    b = base + 0.01 * rng.standard_normal(5)
    (c,) = judge([member("a", list(a)), member("b", list(b))], [claim(["a", "b"])])
    counts[c["verdict"]] += 1
  assert 61 <= counts[stats.HOLDS] <= 139, counts
  assert 61 <= counts[stats.REVERSES] <= 139, counts
  assert counts[stats.NOT_RESOLVED] == 2000 - counts[stats.HOLDS] - counts[stats.REVERSES]


def test_holm_keeps_the_familywise_rate_over_a_table():
  """Four null claims per table: Holm holds the chance of any false 'holds' near 5% (it would
  be ~19% uncorrected)."""
  rng = np.random.default_rng(3)
  any_false = raw_false = 0
  claims = [claim([f"m{i}", f"n{i}"]) for i in range(4)]
  for _ in range(1000):
    members = [member(f"{p}{i}", list(1.4 + 0.01 * rng.standard_normal(5)))
               for i in range(4) for p in "mn"]
    out = judge(members, claims)
    any_false += any(c["verdict"] == stats.HOLDS for c in out)
    raw_false += any(c["tests"][0]["test"].p <= 0.05 for c in out)
  assert any_false <= 50 + 4 * math.sqrt(1000 * 0.05 * 0.95), any_false
  assert raw_false > 120, raw_false  # the uncorrected family rate is far above alpha


def test_chain_is_tested_as_adjacent_pairs_and_pairs_only_shared_seeds():
  a = member("a", [1.0, 1.1, 1.2, 1.3, 1.4])
  b = member("b", [1.1, 1.2, 1.3, 1.4, 9.9], ["completed"] * 4 + ["diverged"])
  c = member("c", [1.0, 1.1, 1.2, 1.3, 1.4])
  (out,) = judge([a, b, c], [claim(["a", "b", "c"], effect=[0.05, 0.05])])
  assert [t["label"] for t in out["tests"]] == ["a > b", "b > c"]
  ab, bc = (t["test"] for t in out["tests"])
  assert ab.n == 4 and ab.estimate == pytest.approx(0.1)  # seed 4's diverged run left out
  assert bc.n == 4 and bc.estimate == pytest.approx(-0.1)
  assert out["tests"][0]["verdict"] == stats.HOLDS  # sd 0: certain
  assert out["verdict"] == stats.REVERSES


# ----------------------------------------------------------------------------- other kinds


def _trend_members(step, noise, seeds=5, rng_seed=0):
  """Members m0 (best) .. m3: CE falls by `step` per member toward m0, plus per-run noise."""
  rng = np.random.default_rng(rng_seed)
  base = 1.4 + 0.05 * rng.standard_normal(seeds)
  return [member(f"m{j}", list(base + step * j + noise * rng.standard_normal(seeds)))
          for j in range(4)]


def test_trend_holds_and_does_not():
  order = ["m0", "m1", "m2", "m3"]
  (c,) = judge(_trend_members(0.02, 0.005), [claim(order, kind="trend", effect=0.01)])
  assert c["verdict"] == stats.HOLDS
  assert c["tests"][0]["test"].estimate == pytest.approx(0.02, abs=0.005)
  (c,) = judge(_trend_members(0.0, 0.005), [claim(order, kind="trend", effect=0.05)])
  assert c["verdict"] == stats.NOT_RESOLVED
  (c,) = judge(_trend_members(-0.02, 0.005), [claim(order, kind="trend")])
  assert c["verdict"] == stats.REVERSES


def test_no_worse_holds_and_does_not():
  rng = np.random.default_rng(5)
  equal = 0.002 * rng.standard_normal(5)
  (c,) = judge(two_members(equal), [claim(["a", "b"], kind="no_worse", margin=0.02)])
  assert c["verdict"] == stats.HOLDS
  t = c["tests"][0]["test"]
  assert t.estimate == pytest.approx(float(np.mean(equal))) and t.target == 0.02
  # a worse than b by 0.05, well past the 0.02 margin: the opposite is significant.
  (c,) = judge(two_members(-0.05 + equal), [claim(["a", "b"], kind="no_worse", margin=0.02)])
  assert c["verdict"] == stats.REVERSES
  # Right at the margin: neither.
  (c,) = judge(two_members(-0.02 + equal), [claim(["a", "b"], kind="no_worse", margin=0.02)])
  assert c["verdict"] == stats.NOT_RESOLVED


def stab_member(name, stable):
  return {"name": name, "overrides": {},
          "runs": [{"seed": s, "status": "completed" if ok else "diverged",
                    "values": {METRIC: 1.0 if ok else None}, "extra": {}}
                   for s, ok in enumerate(stable)]}


def stability_claim(**kw):
  return claim(["a", "b"], kind="stability", metric="stable_fraction", higher_is_better=True,
               **kw)


def test_stability_holds_and_does_not():
  # 6 seeds, b diverges on all, a on none: exact p = 1/2^6.
  (c,) = judge([stab_member("a", [1] * 6), stab_member("b", [0] * 6)], [stability_claim()])
  assert c["tests"][0]["test"].p == pytest.approx(1 / 64) and c["verdict"] == stats.HOLDS
  # 3 seeds cannot reach 0.05 (1/8 at best): no rate difference is detectable.
  (c,) = judge([stab_member("a", [1] * 3), stab_member("b", [0] * 3)],
               [stability_claim(effect=1.0)])
  assert c["tests"][0]["test"].p == pytest.approx(1 / 8)
  assert c["tests"][0]["test"].mde == math.inf and c["verdict"] == stats.NOT_TESTABLE
  # Nothing diverges: no discordant seed, p = 1.
  (c,) = judge([stab_member("a", [1] * 6), stab_member("b", [1] * 6)], [stability_claim()])
  assert c["tests"][0]["test"].p == 1.0 and c["verdict"] == stats.NOT_RESOLVED
  # Paired: 3 seeds where only a diverged, 1 where only b did -> estimate (1 - 3) / 6.
  (c,) = judge([stab_member("a", [0, 0, 0, 1, 1, 1]), stab_member("b", [1, 1, 1, 0, 1, 1])],
               [stability_claim()])
  assert c["tests"][0]["test"].estimate == pytest.approx(-2 / 6)
  assert c["tests"][0]["test"].p == pytest.approx(15 / 16)  # P(Bin(4, 1/2) >= 1)


def test_mechanism_checks_are_their_own_holm_family():
  rng = np.random.default_rng(0)
  strong = two_members(0.05 + 0.005 * rng.standard_normal(5))
  members = strong + [member("c", [1.0] * 5), member("d", [1.0] * 5)]
  out = judge(members, [claim(["a", "b"]), claim(["c", "d"]),
                        claim(["a", "b"], mechanism=True)])
  # Same data, but the published family has 2 tests and the mechanism family 1.
  assert out[0]["tests"][0]["p_adj"] == pytest.approx(2 * out[0]["tests"][0]["test"].p)
  assert out[2]["tests"][0]["p_adj"] == pytest.approx(out[2]["tests"][0]["test"].p)


def test_combine():
  H, R, T, N = stats.HOLDS, stats.REVERSES, stats.NOT_TESTABLE, stats.NOT_RESOLVED
  assert stats.combine([H, H]) == H and stats.combine([H, R]) == R
  assert stats.combine([H, T]) == T and stats.combine([T, N]) == N
  assert stats.combine([stats.NO_DATA]) == stats.NO_DATA
  assert stats.combine([H, stats.NO_DATA]) == N
