r"""Mean k per layer and per kind of token for every member of the adaptive_k table.

  python experiments/adaptive_k_breakdown.py --workdir=runs/adaptive_k [--seed=0] [--batches=4]

For each member of the finished sweep in `--workdir`, takes its run of `--seed`, reads the
per-layer mean k of the last training log window (`metrics.jsonl`: `moe/layer_<i>/mean_k`), and
runs the routing analysis (`moe.inference.analysis.run`, as `launch.py --mode=analyze` does: the
final checkpoint on `--batches` validation batches, so evaluation routing) for the per-layer and
per-token-kind mean k (`moe.inference.token_kinds`). Writes `k_breakdown.md` into `--workdir`
and prints it. The analysis of each run also lands in its own `analysis/` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import rundir, runconfig  # noqa: E402  (after the path fix)
from moe.inference import analysis  # noqa: E402
from moe.inference.token_kinds import KINDS  # noqa: E402


def last_train_record(run: str) -> dict:
  """The last record of the run's metrics.jsonl that holds MoE metrics."""
  last = {}
  with open(rundir.join(run, rundir.METRICS_FILE)) as f:
    for line in f:
      rec = json.loads(line)
      if "moe/mean_k" in rec:
        last = rec
  return last


def member_rows(workdir: str, seed: int, batches: int) -> list[dict]:
  sweep = rundir.read_json(rundir.join(workdir, rundir.SWEEP_FILE))
  if not isinstance(sweep, dict):
    raise SystemExit(f"error: {workdir}/{rundir.SWEEP_FILE} is missing: run the table first")
  rows = []
  for m in sweep["members"]:
    run = rundir.join(workdir, m["name"], f"seed{seed}")
    cfg = runconfig.load(run)
    result = analysis.run(cfg, run, batches=batches)
    rec = last_train_record(run)
    layers = list(result["load"])
    rows.append({"member": m["name"], "layers": layers,
                 "train_mean_k": rec.get("moe/mean_k"),
                 "train_layer_k": [rec.get(f"moe/{n}/mean_k") for n in layers],
                 "eval_layer_k": [result["load"][n]["mean_k"] for n in layers],
                 "kinds": result["token_kinds"], "tokens": result["tokens"]})
  return rows


def _f(x) -> str:
  return "—" if x is None else f"{x:.2f}"


def render(rows: list[dict], workdir: str, seed: int, batches: int) -> str:
  layers = rows[0]["layers"]
  out = [f"# Mean k per layer and per kind of token (`{workdir}`, seed {seed})", "",
         f"Command: `python experiments/adaptive_k_breakdown.py --workdir={workdir} "
         f"--seed={seed} --batches={batches}`. Train: the last logging window of the run "
         "(moe/<layer>/mean_k). Eval: the routing analysis of the final checkpoint on "
         f"{rows[0]['tokens']} validation tokens (eval routing: a top-p member's threshold is "
         "its final value). Kinds: `moe/inference/token_kinds.py`.", "",
         "| member | train mean k | " + " | ".join(f"train {n}" for n in layers) + " | "
         + " | ".join(f"eval {n}" for n in layers) + " |",
         "|---|---|" + "---|" * (2 * len(layers))]
  for r in rows:
    out.append(f"| `{r['member']}` | {_f(r['train_mean_k'])} | "
               + " | ".join(_f(x) for x in r["train_layer_k"]) + " | "
               + " | ".join(_f(x) for x in r["eval_layer_k"]) + " |")
  for n in layers:
    share = rows[0]["kinds"][n]
    out += ["", f"## {n}: eval mean k by kind of token", "",
            "| member | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS),
            "| share of tokens | " + " | ".join(f"{share[k]['share']:.3f}" for k in KINDS) + " |"]
    for r in rows:
      out.append(f"| `{r['member']}` | "
                 + " | ".join(_f(r["kinds"][n][k]["mean_k"]) for k in KINDS) + " |")
  return "\n".join(out) + "\n"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="the adaptive_k sweep's workdir")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batches", type=int, default=4, help="validation batches to route")
  args = ap.parse_args(argv)
  text = render(member_rows(args.workdir, args.seed, args.batches), args.workdir, args.seed,
                args.batches)
  rundir.write_text_atomic(rundir.join(args.workdir, "k_breakdown.md"), text)
  print(text)


if __name__ == "__main__":
  main()
