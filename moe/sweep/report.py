"""The report of a sweep: table.md, table.csv, runs.csv and plot.png, rebuilt from the files alone.

    python -m moe.sweep.report --workdir=runs/<table>

reads `<workdir>/sweep.json` (written by `moe.sweep.runner.run`) and every run's `summary.json`,
`metrics.jsonl`, `eval_<name>.json` and `sweep_run.json`. Runs that are missing, failed or
diverged are shown as such. Means and standard deviations are over the completed seeds of a member
(sample std, ddof=1; a single seed has no std). `runs.csv` keeps every (member, seed) run's values,
so anyone can recompute a verdict; the verdicts themselves (paired tests, Holm) are
`moe/sweep/verdicts.py`. Imports neither jax nor the trainer.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import sys

from moe.errors import ConfigError
from moe.rundir import (METRICS_FILE, RUN_INFO_FILE, SUMMARY_FILE, SWEEP_FILE, eval_file, isdir,
                        join, read_json, read_metrics, replacing, write_text_atomic)
from moe.sweep import verdicts
from moe.sweep.claims import STABLE, parse_metric
from moe.sweep.spec import describe_overrides

# What collect() reads from sweep.json.
SWEEP_KEYS = ("title", "paper", "metric", "higher_is_better", "scale", "smoke", "members", "seeds",
              "published", "eval_overrides", "notes")
# (key in summary.json / metrics.jsonl, column header, number format)
COLUMNS = [
    ("eval_loss", "eval loss", ".4f"),
    ("eval_cross_entropy", "eval CE (nats)", ".4f"),
    ("eval_bits_per_byte", "eval bits/byte", ".4f"),
    ("moe/dropped_fraction", "dropped frac (train)", ".4f"),
    ("eval_moe/dropped_fraction", "dropped frac (eval)", ".4f"),
    ("moe/max_over_mean_load", "max/mean load", ".3f"),
    ("moe/dead_experts", "dead experts (all layers)", ".2f"),
    ("moe/mean_k", "mean k (train)", ".3f"),  # experts per token (adaptive k: varies)
    ("moe/active_expert_flops_per_token", "active expert FLOPs/token (train)", ".4g"),
    ("z_loss", "router z-loss", ".3g"),
    ("loss_spikes", "loss spikes (moe.train.divergence)", ".2f"),
    ("tokens_per_s", "tokens/s", ".0f"),
]
# A key "min_<key>" (e.g. "min_eval_cross_entropy") is the smallest value of <key> over the run's
# metrics.jsonl records and summary: the best evaluation, for selection by held-out loss.
MIN_PREFIX = "min_"
# Every run's status and values, one row per (member, seed), beside table.md.
RUNS_FILE = "runs.csv"


def _finite(v) -> float | None:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  v = float(v)
  return v if math.isfinite(v) else None


def load_run(rundir: str, eval_names: list[str], keys: list[str]) -> dict:
  """Status, final values, loss curve and extra evaluations of one (member, seed) run."""
  summary = read_json(join(rundir, SUMMARY_FILE))
  records = read_metrics(join(rundir, METRICS_FILE))
  if isinstance(summary, dict) and summary.get("status") in ("completed", "diverged", "failed"):
    status = summary["status"]
  elif records or isdir(rundir):
    status = "incomplete"
  else:
    status = "missing"
  summary = summary if isinstance(summary, dict) else {}
  values = {}
  for k in keys:
    if k.startswith(MIN_PREFIX):  # the best value over the run's evaluations (no best checkpoint)
      seen = [_finite(r.get(k[len(MIN_PREFIX):])) for r in records]
      seen = [x for x in seen + [_finite(summary.get(k[len(MIN_PREFIX):]))] if x is not None]
      values[k] = min(seen) if seen else None
      continue
    v = _finite(summary.get(k))
    if v is None:
      v = next((_finite(r[k]) for r in reversed(records) if _finite(r.get(k)) is not None), None)
    values[k] = v
  values[STABLE] = {"completed": 1.0, "diverged": 0.0}.get(status)
  # Training cross-entropy (falls back to the total loss): members with and without auxiliary
  # losses (dense vs MoE) stay comparable.
  curve_key = "cross_entropy" if any("cross_entropy" in r for r in records) else "loss"
  curve = [(r["step"], _finite(r.get(curve_key))) for r in records
           if isinstance(r.get("step"), int) and _finite(r.get(curve_key)) is not None]
  extra = {}
  for name in eval_names:
    e = read_json(join(rundir, eval_file(name)))
    extra[name] = e.get("metrics", {}) if isinstance(e, dict) else None
  info = read_json(join(rundir, RUN_INFO_FILE)) or {}
  return {"status": status, "values": values, "curve": curve, "extra": extra,
          "error": summary.get("error") or info.get("error"), "wall_s": info.get("wall_s"),
          "machine": info.get("machine"), "finished": info.get("finished")}


def mean_std(xs: list[float]) -> tuple[float | None, float | None, int]:
  """Mean and sample std (ddof=1; None for one value) of the finite values."""
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  n = len(xs)
  if n == 0:
    return None, None, 0
  m = sum(xs) / n
  if n == 1:
    return m, None, 1
  return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)), n


def member_stats(runs: list[dict], key: str, extra: str | None = None):
  """(mean, std, n) of `key` over a member's completed seeds (stable_fraction: all finished)."""
  if key == STABLE:
    return mean_std([r["values"][STABLE] for r in runs])
  ok = [r for r in runs if r["status"] == "completed"]
  if extra is None:
    return mean_std([r["values"].get(key) for r in ok])
  return mean_std([_finite((r["extra"].get(extra) or {}).get(key)) for r in ok])


def status_text(runs: list[dict]) -> str:
  counts = {}
  for r in runs:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  order = ("completed", "diverged", "failed", "incomplete", "missing")
  return ", ".join(f"{counts[s]} {s}" for s in order if s in counts)


def _cell(stats, fmt: str, runs: list[dict]) -> str:
  m, s, n = stats
  if n == 0:
    statuses = {r["status"] for r in runs}
    if "completed" in statuses:
      return "—"  # finished, but this value was not logged (e.g. MoE metrics of a dense model)
    for word in ("diverged", "failed", "incomplete"):
      if word in statuses:
        return word
    return "missing"
  text = format(m, fmt)
  return f"{text} ± {format(s, fmt)}" if s is not None else f"{text} (n=1)"


def _fmt(metric: str) -> str:
  return next((f for k, _, f in COLUMNS if k == metric), ".4g")


def collect(workdir: str) -> dict:
  """Everything the report shows, from the files."""
  path = join(workdir, SWEEP_FILE)
  sweep = read_json(path)
  if not isinstance(sweep, dict):
    raise ConfigError(f"{path} is missing or unreadable: run the sweep first "
                      f"(python launch.py --config=configs/ablations/<table>.py "
                      f"--workdir={workdir})")
  missing = [k for k in SWEEP_KEYS if k not in sweep]
  if missing:
    raise ConfigError(f"{path} is not a sweep file written by moe.sweep (no {missing[0]!r})")
  metric = sweep["metric"]
  keys = [k for k, _, _ in COLUMNS]
  refs = [metric] + [p.get("metric", metric) for p in sweep["published"]]
  for ref in refs:
    for _, k, _ in ([] if ref == STABLE else parse_metric(ref)):
      if k not in keys:
        keys.append(k)
  eval_names = [e["name"] for e in sweep["eval_overrides"]]
  members = []
  for m in sweep["members"]:
    runs = [load_run(join(workdir, m["name"], f"seed{s}"), eval_names, keys)
            for s in sweep["seeds"]]
    for r, s in zip(runs, sweep["seeds"]):
      r["seed"] = s
    members.append({"name": m["name"], "overrides": m["overrides"], "runs": runs})
  claims = verdicts.evaluate(members, sweep["published"], metric, sweep["higher_is_better"])
  return {"sweep": sweep, "metric": metric, "keys": keys, "members": members,
          "claims": claims, "eval_names": eval_names}


def _published_cells(data: dict, name: str) -> tuple[str, str]:
  """(rank of the member in each claim's order, the verdicts of the tests it leads)."""
  rank, held = [], []
  for c in data["claims"]:
    if name not in c["order"]:
      continue
    rank.append(f"{c['label']}: {c['order'].index(name) + 1}/{len(c['order'])}")
    for t in c["tests"]:
      if t["members"][0] == name:
        other = "trend" if c["kind"] == "trend" else f"vs {t['members'][1]}"
        held.append(f"{c['label']}: {t['verdict']} {other}")
  return "; ".join(rank) or "—", "; ".join(held) or "—"


def _columns(data: dict) -> list[tuple[str, str, str, str | None]]:
  """(key, header, format, extra-eval name) in table order, the headline metric first."""
  metric = data["metric"]
  cols = [(metric, next((h for k, h, _ in COLUMNS if k == metric), metric), _fmt(metric), None)]
  for name in data["eval_names"]:
    cols.append((metric, f"{cols[0][1]} @ {name}", _fmt(metric), name))
    cols.append(("eval_moe/dropped_fraction", f"dropped frac (eval) @ {name}", ".4f", name))
  cols += [(k, h, f, None) for k, h, f in COLUMNS if k != metric]
  extra_pub = {c["metric"] for c in data["claims"] if c["metric"] == STABLE or (
      "@" not in c["metric"] and " - " not in c["metric"])} - {c[0] for c in cols}
  cols += [(k, "stable seeds" if k == STABLE else k, ".2f" if k == STABLE else ".4g", None)
           for k in sorted(extra_pub)]
  return cols


def _header_lines(data: dict, generated: str) -> list[str]:
  """Title, paper, command, scale and seeds, machine, dates and run counts."""
  sw = data["sweep"]
  runs = [r for m in data["members"] for r in m["runs"]]
  n_done = sum(r["status"] in ("completed", "diverged", "failed") for r in runs)
  machines = sorted({r["machine"] for r in runs if r.get("machine")})
  finished = sorted(r["finished"] for r in runs if r.get("finished"))
  wall = sum(r["wall_s"] or 0.0 for r in runs)
  direction = "higher" if sw["higher_is_better"] else "lower"
  return [
      f"# {sw['title']}", "",
      f"- Paper: {sw['paper']}",
      f"- Command: `{sw.get('command', '')}`",
      f"- Scale: {sw['scale']}{' (SMOKE mode: tiny model, a few steps)' if sw['smoke'] else ''}; "
      f"seeds {sw['seeds']}; headline metric `{data['metric']}` ({direction} is better)",
      f"- Machine: {'; '.join(machines) if machines else 'no run recorded yet'}",
      f"- Date: report generated {generated}"
      + (f"; runs finished {finished[0]} .. {finished[-1]}" if finished else ""),
      f"- Runs: {n_done}/{len(runs)} finished; training wall time {wall:.0f} s in all"
      + ("" if n_done == len(runs) else " — **PARTIAL REPORT**, missing runs listed below"),
      ""]


def _member_table(data: dict) -> list[str]:
  """The members' table: overrides, run statuses, every column, published rank, verdicts."""
  cols = _columns(data)
  header = ["member", "overrides", "runs"] + [c[1] for c in cols] + ["published rank",
                                                                       "held here"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for m in data["members"]:
    cells = [f"`{m['name']}`", describe_overrides(m["overrides"]), status_text(m["runs"])]
    for key, _, fmt, extra in cols:
      cells.append(_cell(member_stats(m["runs"], key, extra), fmt, m["runs"]))
    cells += list(_published_cells(data, m["name"]))
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return lines + [""]


def render_markdown(data: dict, generated: str) -> str:
  sw, members = data["sweep"], data["members"]
  out = io.StringIO()
  w = lambda s="": out.write(s + "\n")  # noqa: E731
  for line in _header_lines(data, generated) + _member_table(data):
    w(line)
  w("Values: mean ± sample std over the completed seeds; '(n=1)': one completed seed. A member "
    "with no completed seed shows its status (diverged / failed / incomplete / missing) instead "
    "of a number; '—': finished but not logged (e.g. MoE metrics of a dense member). Train-time "
    "MoE metrics (dropped fraction, max/mean load, dead experts summed over layers, unweighted "
    "z-loss) are the final logging window's values; tokens/s is the trainer's whole-run "
    "throughput.")
  if data["eval_names"]:
    avail = sw.get("extra_eval_available", True)
    w("Extra evaluations of each finished checkpoint: "
      + "; ".join(f"`{e['name']}` = {describe_overrides(e['overrides'])}"
                  for e in sw["eval_overrides"])
      + ("" if avail else
         " — NOT RUN: the trainer has no `moe.train.trainer.evaluate(cfg, workdir)`"))
  w()
  for line in verdicts.render(data["claims"], _fmt):
    w(line)
  if sw.get("notes"):
    w("## Notes")
    w()
    for n in sw["notes"]:
      w(f"- {n}")
    w()
  bad = [(m["name"], r) for m in members for r in m["runs"] if r["status"] != "completed"]
  if bad:
    w("## Runs not completed")
    w()
    for name, r in bad:
      err = f": {r['error']}" if r.get("error") else ""
      w(f"- `{name}/seed{r['seed']}`: {r['status']}{err}")
    w()
  return out.getvalue()


def render_csv(data: dict) -> str:
  cols = _columns(data)
  out = io.StringIO()
  wr = csv.writer(out)
  head = ["member", "overrides"] + [f"n_{s}" for s in ("completed", "diverged", "failed",
                                                          "incomplete", "missing")]
  for key, _, _, extra in cols:
    name = key if extra is None else f"{key}@{extra}"
    head += [f"{name}_mean", f"{name}_std", f"{name}_n"]
  wr.writerow(head + ["published_rank", "held_here"])
  for m in data["members"]:
    row = [m["name"], json.dumps(m["overrides"])]
    row += [sum(r["status"] == s for r in m["runs"]) for s in ("completed", "diverged", "failed",
                                                                "incomplete", "missing")]
    for key, _, _, extra in cols:
      mean, std, n = member_stats(m["runs"], key, extra)
      row += ["" if mean is None else repr(mean), "" if std is None else repr(std), n]
    wr.writerow(row + list(_published_cells(data, m["name"])))
  return out.getvalue()


def render_runs_csv(data: dict) -> str:
  """One row per (member, seed): status, every reported metric, every extra evaluation's
  metrics (`<key>@<evaluation>`) and the wall time; empty cells for values not logged."""
  runs = [(m["name"], r) for m in data["members"] for r in m["runs"]]
  extra_cols = []
  for name in data["eval_names"]:
    found = sorted({k for _, r in runs for k in (r["extra"].get(name) or {})})
    extra_cols += [(k, name) for k in found]
  out = io.StringIO()
  wr = csv.writer(out)
  wr.writerow(["member", "seed", "status"] + data["keys"] + [STABLE]
              + [f"{k}@{n}" for k, n in extra_cols] + ["wall_s"])
  cell = lambda v: "" if _finite(v) is None else repr(float(v))  # noqa: E731
  for name, r in runs:
    row = [name, r["seed"], r["status"]] + [cell(r["values"].get(k)) for k in data["keys"]]
    row.append(cell(r["values"].get(STABLE)))
    row += [cell((r["extra"].get(n) or {}).get(k)) for k, n in extra_cols]
    wr.writerow(row + [cell(r.get("wall_s"))])
  return out.getvalue()


def render_plot(data: dict, path: str) -> None:
  # matplotlib only when a plot is drawn: import time, and the Agg backend is chosen here, not
  # for whoever imports this module.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  members = data["members"]
  fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(13, 4.8))
  for m in members:
    by_step = {}
    for r in m["runs"]:
      for step, loss in r["curve"]:
        by_step.setdefault(step, []).append(loss)
    if by_step:
      steps = sorted(by_step)
      ax_c.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=m["name"])
  ax_c.set_xlabel("step")
  ax_c.set_ylabel("train cross-entropy (mean over seeds)")
  ax_c.set_title("Training cross-entropy (no auxiliary losses)")
  tail = [y for line in ax_c.lines for x, y in zip(line.get_xdata(), line.get_ydata())
          if x >= 0.2 * max(line.get_xdata())]
  if tail:  # the first steps' loss is far above the rest: zoom on where members differ
    lo, hi = min(tail), max(tail)
    ax_c.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
  if ax_c.lines:
    ax_c.legend(fontsize=7)
  metric, fmt = data["metric"], _fmt(data["metric"])
  xs = list(range(len(members)))
  labeled = set()
  label = lambda text: None if text in labeled or labeled.add(text) else text  # noqa: E731
  for x, m in zip(xs, members):
    mean, std, n = member_stats(m["runs"], metric)
    if n:
      ax_b.errorbar([x], [mean], yerr=[std or 0.0], fmt="o", capsize=4, color="C0",
                    label=label("at its own eval settings"))
    for j, name in enumerate(data["eval_names"]):
      mean, std, n = member_stats(m["runs"], metric, name)
      if n:
        ax_b.errorbar([x + 0.15 * (j + 1)], [mean], yerr=[std or 0.0], fmt="s", capsize=4,
                      color=f"C{j + 1}", label=label(f"@ {name}"))
  lo, hi = ax_b.get_ylim()
  for x, m in zip(xs, members):
    if member_stats(m["runs"], metric)[2] == 0:
      ax_b.text(x, (lo + hi) / 2, _cell((None, None, 0), fmt, m["runs"]), rotation=90,
                ha="center", va="center", color="C3")
  if data["eval_names"] and ax_b.lines:
    ax_b.legend(fontsize=7)
  ax_b.set_xticks(xs)
  ax_b.set_xticklabels([m["name"] for m in members], rotation=30, ha="right", fontsize=7)
  ax_b.set_xlim(-0.5, len(members) - 0.5)
  ax_b.set_ylabel(f"{metric} (mean ± std over seeds)")
  ax_b.set_title(f"Final {metric}")
  fig.suptitle(data["sweep"]["title"], fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, generated: str | None = None) -> dict:
  """Writes table.md, table.csv, runs.csv and plot.png into the sweep's workdir; returns their
  paths."""
  data = collect(workdir)
  generated = generated or datetime.datetime.now().isoformat(timespec="seconds")
  paths = {n: join(workdir, n) for n in ("table.md", "table.csv", RUNS_FILE, "plot.png")}
  write_text_atomic(paths["table.md"], render_markdown(data, generated))
  write_text_atomic(paths["table.csv"], render_csv(data))
  write_text_atomic(paths[RUNS_FILE], render_runs_csv(data))
  with replacing(paths["plot.png"]) as tmp:  # keeps .png: matplotlib picks the format from it
    render_plot(data, tmp)
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Rewrite a sweep's report from its files.")
  parser.add_argument("--workdir", required=True, help="the sweep's workdir (runs/<table>)")
  args = parser.parse_args(argv)
  try:
    paths = write_report(args.workdir)
  except (ConfigError, OSError) as e:  # a wrong --workdir, an unwritable one: one line, exit 2
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2) from None
  print("\n".join(paths.values()))


if __name__ == "__main__":
  main()
