"""Seeds from power: how many seeds a table affords in a time budget, and what they detect.

    python -m moe.sweep.power --workdir=runs/<table> [--minutes=60 --cores=2]

Reads a finished sweep (`moe.sweep.report.collect`: its runs' wall times and the paired tests of
its claims) and prints, in markdown:

- the measured cost of one seed: the summed wall time of the table's runs divided by the number
  of seeds (one-core minutes when, as for the committed tables, two shards or two tables run
  side by side on a 2-core machine, one run per core);
- the seed count the budget affords: floor(minutes * cores / minutes per seed), at least
  MIN_SEEDS;
- per test: the measured paired standard deviation (of the per-seed gaps; of the per-seed slopes
  for a trend), the minimum detectable effect (`moe.sweep.stats.mde`; `stability_mde` for a
  divergence count) at the seeds run and at the afforded count, and the seeds a published effect
  needs (`stats.seeds_needed`).

The afforded count is what a table's config sets as its seeds (the config's docstring quotes the
line); the detectable effects are projections from the measured spread, not results.
"""

from __future__ import annotations

import argparse
import math
import sys

from moe.errors import ConfigError
from moe.sweep import report, stats

MIN_SEEDS = 3


def seed_cost_minutes(data: dict) -> float | None:
  """Summed run wall time of the table / number of seeds, in minutes (None: no timed run)."""
  walls = [r["wall_s"] for m in data["members"] for r in m["runs"]
           if isinstance(r.get("wall_s"), (int, float)) and r["wall_s"] > 0]
  seeds = len(data["sweep"]["seeds"])
  return sum(walls) / 60.0 / seeds if walls and seeds else None


def afforded_seeds(minutes_per_seed: float | None, minutes: float, cores: int) -> int | None:
  """Seeds that fit `minutes` of wall time on `cores` cores, at least MIN_SEEDS."""
  if minutes_per_seed is None or minutes_per_seed <= 0:
    return None
  return max(MIN_SEEDS, math.floor(minutes * cores / minutes_per_seed))


def _detectable(c: dict, test: stats.Test, n: int) -> float:
  if c["kind"] == "stability":
    return stats.stability_mde(n)
  return stats.mde(test.sd, n)


def plan(data: dict, minutes: float = 60.0, cores: int = 2, parent: dict | None = None) -> dict:
  """{"seeds_run", "members", "minutes_per_seed", "seeds", "runs", "wall_minutes", "tests"}:
  the afforded seed count and, per test, its sd and detectable effects (see module doc).
  `parent`: the collected parent sweep of a table whose seeds each need their own parent (its
  cost per seed is added)."""
  per_seed = seed_cost_minutes(data)
  if parent is not None and per_seed is not None:
    per_seed += seed_cost_minutes(parent) or 0.0
  n = afforded_seeds(per_seed, minutes, cores)
  seeds_run = len(data["sweep"]["seeds"])
  tests = []
  for c in data["claims"]:
    for t in c["tests"]:
      test = t["test"]
      need = None
      if c["kind"] != "stability" and test.target is not None:
        need = stats.seeds_needed(test.sd, test.target)
      tests.append({
          "claim": c["label"], "label": t["label"], "kind": c["kind"],
          "mechanism": c["mechanism"], "sd": test.sd,
          "mde_run": _detectable(c, test, test.n),
          "mde_afforded": None if n is None else _detectable(c, test, n),
          "target": test.target, "seeds_for_target": need})
  members = len(data["members"])
  return {"seeds_run": seeds_run, "members": members, "minutes_per_seed": per_seed,
          "seeds": n, "runs": None if n is None else n * members,
          "wall_minutes": None if n is None else n * per_seed / cores, "tests": tests}


def _num(x, fmt: str = ".4f") -> str:
  if x is None:
    return "—"
  if isinstance(x, float) and math.isinf(x):
    return "none"
  return format(x, fmt)


def render(data: dict, p: dict, minutes: float, cores: int, workdir: str,
           parent: str | None = None) -> str:
  sw = data["sweep"]
  with_parent = f", its parent from `{parent}` included" if parent else ""
  lines = [f"### {sw['title']}", "",
           f"`{workdir}`: {p['members']} members x {p['seeds_run']} seeds; "
           f"{_num(p['minutes_per_seed'], '.2f')} one-core minutes per seed (all members"
           f"{with_parent}). "
           f"Budget {minutes:g} minutes on {cores} cores: **{_num(p['seeds'], 'd')} seeds**, "
           f"{_num(p['runs'], 'd')} runs, about {_num(p['wall_minutes'], '.0f')} minutes.", "",
           f"| claim | test | kind | paired sd | detectable at {p['seeds_run']} seeds | "
           f"detectable at {_num(p['seeds'], 'd')} seeds | effect to detect | "
           "seeds for that effect |",
           "|---|---|---|---|---|---|---|---|"]
  for t in p["tests"]:
    kind = t["kind"] + (" (mechanism)" if t["mechanism"] else "")
    lines.append(f"| {t['claim']} | {t['label']} | {kind} | {_num(t['sd'])} | "
                 f"{_num(t['mde_run'])} | {_num(t['mde_afforded'])} | {_num(t['target'])} | "
                 f"{_num(t['seeds_for_target'], 'd')} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description="Seeds a finished table affords in a time budget.")
  ap.add_argument("--workdir", required=True, action="append",
                  help="a finished sweep's workdir (runs/<table>); repeat for several")
  ap.add_argument("--minutes", type=float, default=60.0, help="wall-time budget per table")
  ap.add_argument("--cores", type=int, default=2, help="runs side by side (one per core)")
  ap.add_argument("--parent", action="append", default=[],
                  help="the parent sweep's workdir of each --workdir whose seeds each train a "
                       "parent first (upcycling, fine-tuning); '' for none")
  args = ap.parse_args(argv)
  if not (args.minutes > 0 and args.cores >= 1):
    print("error: --minutes must be > 0 and --cores >= 1", file=sys.stderr)
    raise SystemExit(2)
  if args.parent and len(args.parent) != len(args.workdir):
    print("error: --parent must be given once per --workdir ('' for none)", file=sys.stderr)
    raise SystemExit(2)
  out = []
  for w, parent_dir in zip(args.workdir, args.parent or [""] * len(args.workdir)):
    try:
      data = report.collect(w)
      parent = report.collect(parent_dir) if parent_dir else None
    except (ConfigError, OSError) as e:
      print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
      raise SystemExit(2) from None
    p = plan(data, args.minutes, args.cores, parent)
    out.append(render(data, p, args.minutes, args.cores, w, parent_dir or None))
  print("\n".join(out))


if __name__ == "__main__":
  main()
