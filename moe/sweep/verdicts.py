"""A table's claims checked against its runs: per-seed values, paired tests, Holm, verdicts, text.

`evaluate(members, published)` takes the members as `moe.sweep.report.collect` loads them (each
run with its seed, status, values and extra evaluations) and the claims (`moe/sweep/claims.py`)
and returns one result per claim: its tests (`moe/sweep/stats.py`), each with the Holm-adjusted
p-values and a verdict, and the claim's verdict. `render(results)` writes the markdown sections
(published claims, then mechanism checks) and RULE, the rule every table.md states.
"""

from __future__ import annotations

import math

import numpy as np

from moe.sweep import stats
from moe.sweep.claims import STABLE, parse_metric, with_defaults

RULE = (
    "**Rule.** Runs of two members with the same seed are paired: they read the same training "
    "batches in the same order and start from the same non-MoE weights (the embedding, "
    "attention, norms and output layer are drawn from the seed's key by module path, so a "
    "different MoE config leaves them bit-identical; members that differ only in settings "
    "without parameters start from identical weights). Each comparison uses the per-seed "
    "differences over the seeds both members completed, signed so that a positive gap is the "
    "claimed direction. `order`: a one-sided paired t-test for every adjacent pair of the "
    "published order. `trend`: per seed, the least-squares slope of the metric over the "
    "members' positions (per member step), then a one-sided t-test of the slopes. `no_worse`: "
    "non-inferiority, a one-sided t-test that the gap is above minus the margin. `stability`: "
    "McNemar's exact test of paired divergences (binomial, 1/2, on the seeds where exactly one "
    "member diverged). One-sided alpha = 0.05 after Holm's step-down correction over the tests "
    "of the table's published claims (mechanism checks are corrected among themselves); the "
    "interval is the two-sided 95% t-interval of the mean gap. Detectable effect (MDE): the "
    "true gap a test detects with power 0.8 at one-sided alpha 0.05 with this many seeds, from "
    "the noncentral t distribution and the paired standard deviation (stability: the "
    "divergence-rate difference when the stable member never diverges); Holm makes the "
    "detectable effect larger still, so it is a lower bound. Effect to detect: the published "
    "effect (`no_worse`: the margin plus the published gap); seeds for that effect: the seed "
    "count whose detectable effect reaches it at the measured paired standard deviation. "
    "**holds**: significant in the "
    "published direction; **reverses**: significant the other way; **not testable at this "
    "scale**: neither, and the effect to detect is below the detectable effect; **not "
    "resolved**: otherwise, and always when no published effect is given (a direction only); "
    "**n/a**: no seed where both members completed.")


def run_value(run: dict, ref: str) -> float | None:
  """A run's value of a metric reference (claims.parse_metric), None if a part is missing."""
  if ref == STABLE:
    return run["values"].get(STABLE)
  total = 0.0
  for sign, key, extra in parse_metric(ref):
    src = run["values"] if extra is None else (run["extra"].get(extra) or {})
    v = src.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return None
    total += sign * float(v)
  return total


def per_seed(member: dict, ref: str) -> dict[int, float]:
  """{seed: value} over a member's completed runs (stable_fraction: its finished runs)."""
  out = {}
  for r in member["runs"]:
    if ref == STABLE and r["status"] in ("completed", "diverged"):
      out[r["seed"]] = 1.0 if r["status"] == "completed" else 0.0
    elif ref != STABLE and r["status"] == "completed":
      v = run_value(r, ref)
      if v is not None:
        out[r["seed"]] = v
  return out


def _pair_effect(c: dict, j: int) -> float | None:
  e = c["effect"]
  return e[j] if isinstance(e, list) else e


def _tests(c: dict, values: dict[str, dict[int, float]]) -> list[dict]:
  """The claim's tests: [{"label", "members", "test"}]."""
  sign = 1.0 if c["higher_is_better"] else -1.0
  order = c["order"]
  if c["kind"] == "trend":
    seeds = sorted(set.intersection(*(set(values[m]) for m in order)))
    q = np.array([[sign * values[m][s] for m in order] for s in seeds]).reshape(
        len(seeds), len(order))
    return [{"label": " > ".join(order), "members": order,
             "test": stats.trend(q, c["effect"])}]
  out = []
  for j, (a, b) in enumerate(zip(order, order[1:])):
    seeds = sorted(set(values[a]) & set(values[b]))
    if c["kind"] == "stability":
      t = stats.stability([values[a][s] > 0 for s in seeds], [values[b][s] > 0 for s in seeds],
                          _pair_effect(c, j))
    else:
      d = [sign * (values[a][s] - values[b][s]) for s in seeds]
      if c["kind"] == "no_worse":
        t = stats.no_worse(d, c["margin"], c["effect"])
      else:
        t = stats.paired(d, _pair_effect(c, j))
    rel = "no worse than" if c["kind"] == "no_worse" else ">"
    out.append({"label": f"{a} {rel} {b}", "members": [a, b], "test": t})
  return out


def evaluate(members: list[dict], published: list[dict], metric: str = "eval_cross_entropy",
             higher_is_better: bool = False, alpha: float = stats.ALPHA) -> list[dict]:
  """Every claim with its tests, Holm-adjusted p-values and verdicts (see RULE)."""
  by_name = {m["name"]: m for m in members}
  claims = []
  for i, pub in enumerate(published):
    c = with_defaults(pub, metric, higher_is_better)
    values = {n: per_seed(by_name[n], c["metric"]) for n in c["order"]}
    c["label"] = chr(ord("A") + i) if i < 26 else f"P{i}"
    c["tests"] = _tests(c, values)
    claims.append(c)
  for mechanism in (False, True):  # two Holm families
    tests = [t for c in claims if c["mechanism"] == mechanism for t in c["tests"]]
    p_adj = stats.holm([t["test"].p for t in tests])
    p_rev = stats.holm([t["test"].p_reverse for t in tests])
    for t, pa, pr in zip(tests, p_adj, p_rev):
      t["p_adj"], t["p_reverse_adj"] = pa, pr
      t["verdict"] = stats.verdict(t["test"], pa, pr, alpha)
  for c in claims:
    c["verdict"] = stats.combine([t["verdict"] for t in c["tests"]])
  return claims


def _num(x: float | None, fmt: str) -> str:
  if x is None:
    return "—"
  if math.isinf(x):
    return "none at this n"
  return format(x, fmt)


def _p(x: float | None) -> str:
  return "—" if x is None else ("<0.001" if x < 1e-3 else f"{x:.3f}")


def _effect_text(c: dict, fmt: str) -> str:
  e = c["effect"]
  if e is None:
    return "none given (direction only)"
  if isinstance(e, list):
    return ", ".join(format(x, fmt) for x in e) + " (per adjacent pair)"
  unit = {"trend": " per member step", "stability": " (divergence-rate difference)"}
  return format(e, fmt) + unit.get(c["kind"], "")


def _test_row(t: dict, fmt: str) -> list[str]:
  x = t["test"]
  if x.low is not None:
    gap = f"{_num(x.estimate, fmt)} [{_num(x.low, fmt)}, {_num(x.high, fmt)}]"
  else:
    gap = _num(x.estimate, fmt)
  if x.detail:
    gap += f" ({x.detail})"
  need = "—"
  if x.target is not None and x.sd:
    n = stats.seeds_needed(x.sd, x.target)
    need = str(n) if n is not None else ">1000"
  return [t["label"], str(x.n), gap, _p(x.p), _p(t.get("p_adj")), _num(x.mde, fmt),
          _num(x.target, fmt), need, f"**{t['verdict']}**"]


def render(claims: list[dict], fmt_of) -> list[str]:
  """Markdown lines: the published claims, then the mechanism checks, then RULE. fmt_of(metric)
  gives a number format."""
  lines = []
  for mechanism, title in ((False, "Published claims"), (True, "Mechanism checks")):
    group = [c for c in claims if c["mechanism"] == mechanism]
    if not group:
      continue
    lines += [f"## {title}", ""]
    if mechanism:
      lines += ["Checks of how the mechanism works, not published results; a Holm family of "
                "their own.", ""]
    for c in group:
      fmt = ".2f" if c["kind"] == "stability" else fmt_of(c["metric"])
      better = "higher" if c["higher_is_better"] else "lower"
      lines.append(f"**{c['label']}.** {c['claim']} — kind `{c['kind']}`; source: {c['source']}."
                   f" Metric `{c['metric']}`, {better} is better; order, best first: "
                   f"{' > '.join(c['order'])}.")
      lines.append("")
      lines.append(f"Published: {c['published'] or '(numbers not given)'}; published effect: "
                   f"{_effect_text(c, fmt)}"
                   + (f"; margin {format(c['margin'], fmt)}" if c["margin"] is not None else "")
                   + f". Verdict: **{c['verdict']}**.")
      lines.append("")
      head = ["test", "seeds", "our gap [95% CI]", "p", "p (Holm)", "detectable effect",
              "effect to detect", "seeds for that effect", "verdict"]
      lines.append("| " + " | ".join(head) + " |")
      lines.append("|" + "---|" * len(head))
      for t in c["tests"]:
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in _test_row(t, fmt)) + " |")
      lines.append("")
  if claims:
    lines += [RULE, ""]
  return lines
