"""The claim format: one entry of `cfg.sweep.published`, validated (`check_claim`) and normalised.

  {"claim": text, "source": "paper, table / figure / section",
   "order": [member index or name, ...]    best first (see the kinds),
   "kind": "order" | "trend" | "no_worse" | "stability"
           (default "stability" when metric is "stable_fraction", else "order"),
   "metric": a metric reference (default: the table's metric),
   "higher_is_better": bool (default: the table's),
   "published": text, the paper's own numbers (default ""),
   "effect": the published effect in the table's metric units, or None (direction only),
   "margin": > 0, no_worse only,
   "mechanism": bool (default False): a check of how the mechanism works (drops fall as the
                capacity grows), reported apart from the published results}

Kinds (the tests: `moe/sweep/stats.py`):
  order      every adjacent pair of `order` (at least 2 members) is tested, first better than
             second; effect: one number for every pair or a list with one per pair, each > 0.
  trend      quality rises toward the first of `order` (at least 3 members), a seed-blocked
             slope; effect (> 0): the published mean change per member step.
  no_worse   `order` = [a, b]: a is worse than b by less than `margin` (required, > 0); effect:
             the published gap of a over b in the better direction (may be <= 0, but
             margin + effect > 0).
  stability  every adjacent pair: the first diverges less often; metric "stable_fraction" (its
             only metric); effect: the published difference of the divergence rates, in (0, 1].

A metric reference is a metric key ("eval_cross_entropy"), a key at an extra evaluation
("eval_cross_entropy@ecf2", `sweep.eval_overrides`), or the difference of two such references
("eval_cross_entropy - eval_cross_entropy@ecf2": what the evaluation at capacity 2.0 gains).
"""

from __future__ import annotations

import math

from moe.errors import ConfigError

KINDS = ("order", "trend", "no_worse", "stability")
STABLE = "stable_fraction"  # the metric of stability claims: 1 per completed, 0 per diverged run
FIELDS = ("claim", "source", "order", "kind", "metric", "higher_is_better", "published",
          "effect", "margin", "mechanism")
REQUIRED = ("claim", "source", "order")
MIN_MEMBERS = {"order": 2, "trend": 3, "no_worse": 2, "stability": 2}


def default_kind(metric: str) -> str:
  return "stability" if metric == STABLE else "order"


def parse_metric(ref: str) -> list[tuple[int, str, str | None]]:
  """A metric reference as [(sign, key, extra-evaluation name or None)]: 'a - b@e' ->
  [(1, 'a', None), (-1, 'b', 'e')]. ValueError when it is not one."""
  parts = [x.strip() for x in str(ref).split(" - ")]
  if not 1 <= len(parts) <= 2 or not all(parts):
    raise ValueError(f"{ref!r} is not 'key', 'key@eval' or 'ref - ref'")
  out = []
  for sign, part in zip((1, -1), parts):
    key, _, name = part.partition("@")
    if not key or (part.count("@") > 1) or ("@" in part and not name) or " " in part:
      raise ValueError(f"{ref!r} is not 'key', 'key@eval' or 'ref - ref'")
    out.append((sign, key, name or None))
  return out


def with_defaults(pub: dict, metric: str, higher_is_better: bool) -> dict:
  """A claim with every field (a sweep.json written before a field existed reads the same)."""
  m = str(pub.get("metric", metric))
  return {"claim": str(pub["claim"]), "source": str(pub["source"]), "order": list(pub["order"]),
          "kind": pub.get("kind", default_kind(m)), "metric": m,
          "higher_is_better": bool(pub.get("higher_is_better", higher_is_better)),
          "published": str(pub.get("published", "")), "effect": pub.get("effect"),
          "margin": pub.get("margin"), "mechanism": bool(pub.get("mechanism", False))}


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_effect(what: str, c: dict) -> None:
  kind, effect, n_pairs = c["kind"], c["effect"], len(c["order"]) - 1
  if effect is None:
    return
  if kind == "order" and isinstance(effect, (list, tuple)):
    if len(effect) != n_pairs or not all(_number(e) and e > 0 for e in effect):
      raise ConfigError(f"{what}.effect must be a number > 0 or a list of {n_pairs} numbers > 0 "
                        f"(one per adjacent pair of order), got {effect!r}")
    c["effect"] = [float(e) for e in effect]
    return
  if not _number(effect):
    raise ConfigError(f"{what}.effect must be a number in the metric's units or None, "
                      f"got {effect!r}")
  if kind in ("order", "trend") and effect <= 0:
    raise ConfigError(f"{what}.effect must be > 0 (the published gap in the claimed direction), "
                      f"got {effect!r}")
  if kind == "stability" and not 0 < effect <= 1:
    raise ConfigError(f"{what}.effect must be a difference of divergence rates in (0, 1], "
                      f"got {effect!r}")
  if kind == "no_worse" and c["margin"] + effect <= 0:
    raise ConfigError(f"{what}: margin + effect must be > 0 (the claim cannot hold otherwise), "
                      f"got {c['margin']!r} + {effect!r}")
  c["effect"] = float(effect)


def check_claim(pub, i: int, member_names: list[str], metric: str, higher_is_better: bool,
                eval_names: list[str]) -> dict:
  """Validates `sweep.published[i]` (member references resolved to names); ConfigError, one
  line, naming the field."""
  what = f"sweep.published[{i}]"
  if not isinstance(pub, dict) or not set(REQUIRED) <= set(pub) or not set(pub) <= set(FIELDS):
    raise ConfigError(f"{what} must be a dict with keys {list(REQUIRED)} (+ optional "
                      f"{[f for f in FIELDS if f not in REQUIRED]}), got keys "
                      f"{sorted(pub) if isinstance(pub, dict) else type(pub).__name__}")
  if not isinstance(pub["order"], (list, tuple)):
    raise ConfigError(f"{what}.order must be a list of member indices or names")
  order = []
  for ref in pub["order"]:
    if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(member_names):
      order.append(member_names[ref])
    elif isinstance(ref, str) and ref in member_names:
      order.append(ref)
    else:
      raise ConfigError(f"{what}.order: {ref!r} is neither a member index "
                        f"(0..{len(member_names)-1}) nor a member name ({sorted(member_names)})")
  c = with_defaults({**pub, "order": order}, metric, higher_is_better)
  if c["kind"] not in KINDS:
    raise ConfigError(f"{what}.kind must be one of {list(KINDS)}, got {c['kind']!r}")
  need = MIN_MEMBERS[c["kind"]]
  if len(order) < need or len(set(order)) != len(order) or (
      c["kind"] == "no_worse" and len(order) != 2):
    many = "exactly" if c["kind"] == "no_worse" else "at least"
    raise ConfigError(f"{what}.order must list {many} {need} distinct members for kind "
                      f"{c['kind']!r}, got {order}")
  try:
    refs = parse_metric(c["metric"])
  except ValueError as e:
    raise ConfigError(f"{what}.metric: {e}") from None
  bad = [n for _, _, n in refs if n is not None and n not in eval_names]
  if bad:
    raise ConfigError(f"{what}.metric: {bad[0]!r} is no extra evaluation "
                      f"(sweep.eval_overrides names: {eval_names})")
  if (c["kind"] == "stability") != (c["metric"] == STABLE):
    raise ConfigError(f"{what}: kind 'stability' goes with metric {STABLE!r} and only with it, "
                      f"got kind {c['kind']!r} and metric {c['metric']!r}")
  if "higher_is_better" in pub and not isinstance(pub["higher_is_better"], bool):
    raise ConfigError(f"{what}.higher_is_better must be True or False")
  if "mechanism" in pub and not isinstance(pub["mechanism"], bool):
    raise ConfigError(f"{what}.mechanism must be True or False, got {pub['mechanism']!r}")
  if c["kind"] == "no_worse":
    if not (_number(c["margin"]) and c["margin"] > 0):
      raise ConfigError(f"{what}.margin must be a number > 0 in the metric's units for kind "
                        f"'no_worse', got {c['margin']!r}")
    c["margin"] = float(c["margin"])
  elif c["margin"] is not None:
    raise ConfigError(f"{what}.margin is for kind 'no_worse' only (kind is {c['kind']!r})")
  _check_effect(what, c)
  return c


def smoke_claim(c: dict, names: set) -> dict | None:
  """A claim restricted to the members smoke mode keeps, or None when too few remain."""
  order = [n for n in c["order"] if n in names]
  if len(order) < MIN_MEMBERS[c["kind"]] or (c["kind"] == "no_worse" and len(order) != 2):
    return None
  effect = c["effect"]
  if isinstance(effect, list) and order != c["order"]:
    effect = None  # the adjacent pairs changed; their published gaps no longer apply
  return {**c, "order": order, "effect": effect}
