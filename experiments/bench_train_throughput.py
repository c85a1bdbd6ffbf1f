"""Training throughput of the default MoE config against its dense baseline, side by side.

    python experiments/bench_train_throughput.py [--steps=40] [--rounds=2] [--output=BENCHMARKS.md]

Trains `configs/default.py` and `configs/dense.py` (same data, batch, sequence length, active
FFN width K*F) for a few steps each, alternating MoE and dense `--rounds` times in fresh
workdirs, and reads the trainer's own tokens/s (compilation excluded). The ratio MoE / dense is
taken per round (the two runs of a round are back to back, so machine load hits both alike);
the target is >= 0.85. Prints a table and writes it to the "Training throughput: default MoE
vs dense baseline" section of BENCHMARKS.md (only that section is rewritten). The runs train in
this process under launch.py's conditions: `moe.allocator` is applied before JAX is imported
(`MOE_SYSTEM_MALLOC=1` keeps glibc's defaults), and the section header records it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

from bench_common import (ROOT, apply_allocator, command_line, loadavg, machine, versions,
                          write_section)

ALLOCATOR = apply_allocator()  # launch.py's malloc setting, before JAX is imported
sys.path.insert(0, ROOT)

from configs import default as default_cfg  # noqa: E402
from configs import dense as dense_cfg  # noqa: E402
from moe.train import trainer as train  # noqa: E402

HEADING = "## Training throughput: default MoE vs dense baseline"


def _run(get_config, steps: int, workdir: str, data_dir: str) -> float:
  cfg = get_config()
  cfg.train.steps = steps
  cfg.train.warmup_steps = 1
  cfg.train.log_every = steps
  cfg.train.eval_every = steps
  cfg.train.eval_batches = 1
  cfg.train.checkpoint_every = steps
  cfg.data.tfds_data_dir = data_dir
  return float(train.train_and_evaluate(cfg, workdir)["tokens_per_s"])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--data_dir", default=os.path.join(ROOT, "runs", ".tfds"),
                  help="TFDS data dir (default: runs/.tfds in the repository)")
  ap.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"),
                  help="markdown file whose section is rewritten ('' to skip)")
  args = ap.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      moe_tps = _run(default_cfg.get_config, args.steps, f"{tmp}/moe{r}", args.data_dir)
      dense_tps = _run(dense_cfg.get_config, args.steps, f"{tmp}/dense{r}", args.data_dir)
      rows.append((r, moe_tps, dense_tps, moe_tps / dense_tps))
      print(f"round {r}: MoE {moe_tps:.0f} tok/s, dense {dense_tps:.0f} tok/s, "
            f"ratio {moe_tps / dense_tps:.2f}", flush=True)
  median = statistics.median(r[3] for r in rows)
  lines = [HEADING, "",
           f"Measured {datetime.date.today()} on {machine()}; {versions()}; load average at the "
           f"end {loadavg()}.",
           f"Command: `{command_line()}`. Tokens/s is the trainer's own (compilation excluded); "
           "each round trains the MoE default and then the dense baseline from scratch, in this "
           f"process under launch.py's allocator setting ({ALLOCATOR}).", "",
           "| round | MoE tokens/s | dense tokens/s | MoE / dense |", "| --- | --- | --- | --- |"]
  lines += [f"| {r} | {m:.0f} | {d:.0f} | {q:.2f} |" for r, m, d, q in rows]
  lines += ["", f"Median ratio {median:.3f} (target >= 0.85: "
            f"{'reached' if median >= 0.85 else 'NOT reached'})."]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.output:
    write_section(args.output, HEADING, text)


if __name__ == "__main__":
  main()
