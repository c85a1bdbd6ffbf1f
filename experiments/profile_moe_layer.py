"""Where the MoE layer's time goes on CPU: forward and backward apart, and the cost of few rows
per expert.

    python experiments/profile_moe_layer.py            # ~6 min on the 2-core machine
    python experiments/profile_moe_layer.py --smoke    # tiny shapes; writes nothing without --output

Same conditions as experiments/bench_moe_layer.py (a training run's malloc setting, f32, the
shapes of the issue: T = 8192, D = 256, F = 1024, K = 2; MoE and dense calls alternate, medians
of per-pair ratios). Two tables go to the "Where the MoE layer's time goes (CPU)" section of
BENCHMARKS.md:

1. Forward and backward apart: for each E and strategy, the whole `MoeLayer` forward (jit of the
   output sum) and forward+backward, each as a ratio to the dense SwiGLU FFN of width K*F timed
   the same way; backward = (forward+backward) - forward.
2. Expert matmuls alone, no routing: a SwiGLU FFN batched over E experts with M = T*K/E rows
   each (E*M = T*K rows in all, the rows a dropless layer computes), forward+backward, as a ratio
   to one SwiGLU FFN of width F on the same T*K rows (same FLOPs). This is the floor of any
   strategy that runs each expert's rows through its own matmuls: what remains when routing,
   padding and data movement cost nothing.
3. How the dropless `grouped` layer splits the rows its own router sends it (counts, not times):
   the batched block of the mean rows per expert, the overflow rows run in tiles (each tile reads
   its expert's weights again), and the block's empty rows.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

from bench_common import (ROOT, apply_allocator, command_line, loadavg, machine, race, versions,
                          write_section)

SECTION = "## Where the MoE layer's time goes (CPU)"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
  p.add_argument("--repeats", type=int, default=None, help="timed pairs per entry (default 5)")
  p.add_argument("--output", default=None,
                 help="markdown file whose section is rewritten ('' to skip; default "
                 "BENCHMARKS.md, none with --smoke)")
  args = p.parse_args(argv)
  if args.output is None:
    args.output = "" if args.smoke else os.path.join(ROOT, "BENCHMARKS.md")
  return args


args = parse_args()
ALLOCATOR = apply_allocator()
sys.path.insert(0, ROOT)

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe.layer import dispatch  # noqa: E402
from moe.layer import grouped  # noqa: E402
from moe.layer import routing as routing_lib  # noqa: E402
from moe.layer import rows as rows_lib  # noqa: E402
from moe.layer.config import MoeConfig  # noqa: E402
from moe.layer.modules import MoeLayer  # noqa: E402

if args.smoke:
  T, D, F, K, EXPERTS, GEMM_EXPERTS = 256, 32, 64, 2, (4, 8), (1, 4, 8)
else:
  T, D, F, K, EXPERTS, GEMM_EXPERTS = 8192, 256, 1024, 2, (8, 64, 256), (1, 8, 32, 64, 128, 256)
REPEATS = args.repeats or (1 if args.smoke else 5)
CF = 1.25


def swiglu(x, w_in, w_gate, w_out):
  return (jax.nn.silu(x @ w_gate) * (x @ w_in)) @ w_out


def dense_fns(rows, hidden, seed=0):
  """(forward, forward+backward) of a SwiGLU FFN of width `hidden` on `rows` rows."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (rows, D))
  w = (jax.random.normal(k[1], (D, hidden)) / 16, jax.random.normal(k[2], (D, hidden)) / 16,
       jax.random.normal(k[3], (hidden, D)) / 32)
  loss = lambda x, w: jnp.sum(swiglu(x, *w))  # noqa: E731
  fwd, step = jax.jit(loss), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return (lambda: jax.block_until_ready(fwd(x, w))), (lambda: jax.block_until_ready(step(x, w)))


def layer_fns(E, capacity_factor, strategy, seed=0):
  """(forward, forward+backward, resolved strategy) of the whole MoeLayer."""
  cfg = MoeConfig(num_experts=E, num_selected=K, expert_hidden=F,
                  capacity_factor=capacity_factor, dispatch=strategy)
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  x = jax.random.normal(k[0], (1, T, D))
  layer = MoeLayer(cfg)
  params = flax.linen.meta.unbox(layer.init(k[1], x, train=True)["params"])
  loss = lambda x, p: jnp.sum(layer.apply({"params": p}, x, train=True))  # noqa: E731
  fwd, step = jax.jit(loss), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  capacity = routing_lib.capacity_for(T, E, K, capacity_factor, cfg.min_capacity)
  resolved = dispatch.resolve_strategy(strategy, capacity, jax.default_backend(), capacity)
  return ((lambda: jax.block_until_ready(fwd(x, params))),
          (lambda: jax.block_until_ready(step(x, params))), resolved)


def batched_fns(E, seed=0):
  """forward+backward of a SwiGLU FFN batched over E experts, T*K/E rows each."""
  M = T * K // E
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (E, M, D))
  w = (jax.random.normal(k[1], (E, D, F)) / 16, jax.random.normal(k[2], (E, D, F)) / 16,
       jax.random.normal(k[3], (E, F, D)) / 32)
  step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(swiglu(x, *w)), argnums=(0, 1)))
  return lambda: jax.block_until_ready(step(x, w))


def block_facts(E, seed=0):
  """How the dropless `grouped` layer lays out the rows its own router (at initialisation, the
  benchmark's) sends it: block rows per expert, overflow rows and their tiles, empty block rows."""
  cfg = MoeConfig(num_experts=E, num_selected=K, expert_hidden=F, capacity_factor=None,
                  dispatch="grouped")
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  x = jax.random.normal(k[0], (1, T, D))
  params = flax.linen.meta.unbox(MoeLayer(cfg).init(k[1], x, train=True)["params"])
  logits = jnp.einsum("GTD,DE->GTE", x, params["router"]["kernel"])
  routing = routing_lib.top_k_routing(logits, num_selected=K, capacity=None)
  bulk, tile = grouped.plan(dispatch.planned_rows(routing, E))
  _, _, num_tiles = rows_lib.tiled_layout(routing.expert_index, routing.slot, E, tile, bulk)
  counts = jnp.bincount(routing.expert_index.reshape(-1), length=E)
  over = jnp.maximum(counts - bulk, 0)
  return {"E": E, "bulk": bulk, "tile": tile, "tiles": int(num_tiles),
          "overflow": int(jnp.sum(over)), "busy": int(jnp.sum(over > 0)),
          "empty": int(jnp.sum(jnp.maximum(bulk - counts, 0))), "max": int(counts.max())}


def ratio(a, b):
  return statistics.median(x[0] / y[0] for x, y in zip(a, b))


def ms(a):
  return 1e3 * statistics.median(x[0] for x in a)


def fwd_bwd_table():
  """Rows (E, label, fwd ms, fwd ratio, bwd ms, bwd ratio, total ratio)."""
  dense_f, dense_s = dense_fns(T, K * F)
  out = []
  for E in EXPERTS:
    for cf, strategy, what in ((CF, "auto", "cf 1.25"), (CF, "grouped", "cf 1.25"),
                               (CF, "gather", "cf 1.25"), (None, "auto", "dropless")):
      f, s, resolved = layer_fns(E, cf, strategy)
      label = f"{strategy} -> {resolved}, {what}" if strategy == "auto" else f"{strategy}, {what}"
      t = race({"dense_f": dense_f, "moe_f": f, "dense_s": dense_s, "moe_s": s}, REPEATS)
      bwd = [(ms_[0] - mf[0], 0.0) for ms_, mf in zip(t["moe_s"], t["moe_f"])]
      dbwd = [(ds[0] - df[0], 0.0) for ds, df in zip(t["dense_s"], t["dense_f"])]
      row = (E, label, ms(t["moe_f"]), ratio(t["moe_f"], t["dense_f"]), ms(bwd), ratio(bwd, dbwd),
             ratio(t["moe_s"], t["dense_s"]))
      print(f"E={E:4d} {label:28s} fwd {row[2]:7.0f} ms x{row[3]:.2f}  bwd {row[4]:7.0f} ms "
            f"x{row[5]:.2f}  total x{row[6]:.2f}", flush=True)
      out.append(row)
  return out


def gemm_table():
  """Rows (E, rows per expert, batched ms, dense ms, ratio)."""
  _, dense_s = dense_fns(T * K, F, seed=1)
  out = []
  for E in GEMM_EXPERTS:
    t = race({"dense": dense_s, "batched": batched_fns(E)}, REPEATS)
    row = (E, T * K // E, ms(t["batched"]), ms(t["dense"]), ratio(t["batched"], t["dense"]))
    print(f"E={E:4d} rows/expert {row[1]:6d}: batched {row[2]:6.0f} ms, one FFN {row[3]:6.0f} ms, "
          f"x{row[4]:.2f}", flush=True)
    out.append(row)
  return out


def render(meta, fb_rows, gemm_rows, split_rows, wall_s):
  lines = [SECTION, "",
           f"Measured {meta['date']} on {machine()}; {versions()}.",
           f"Command: `{command_line()}`. Load average before/after: {meta['load_before']} / "
           f"{loadavg()}. Total {wall_s / 60:.1f} min. Conditions as in the microbenchmark "
           f"above ({ALLOCATOR}).", "",
           f"Forward and backward apart (T={T}, D={D}, F={F}, K={K}, f32; ratios to the dense "
           f"SwiGLU FFN of width K*F timed the same way; backward = forward+backward - "
           f"forward):", "",
           "| E | strategy | forward ms | forward ratio | backward ms | backward ratio | "
           "total ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for E, label, fm, fr, bm, br, tr in fb_rows:
    lines.append(f"| {E} | {label} | {fm:.1f} | {fr:.2f} | {bm:.1f} | {br:.2f} | {tr:.2f} |")
  lines += ["", f"Expert matmuls alone: a SwiGLU FFN batched over E experts with T*K/E rows each "
            f"({T * K} rows in all), forward+backward, against one SwiGLU FFN of width F on the "
            f"same {T * K} rows (the same FLOPs); no routing, no padding, no data movement:", "",
            "| E | rows per expert | batched ms | one FFN ms | ratio |", "| --- | --- | --- | --- | --- |"]
  for E, m, b, d, r in gemm_rows:
    lines.append(f"| {E} | {m} | {b:.1f} | {d:.1f} | {r:.2f} |")
  lines += ["", "How the dropless `grouped` layer lays out the rows its own router (at "
            "initialisation, as in the tables above) sends it (`grouped.plan`): a batched block "
            "of the mean rows per expert, the overflow in tiles, each tile reading its expert's "
            "[D, F] weights again:", "",
            "| E | block rows x E | busiest expert's rows | experts over the block | overflow "
            "rows | tiles | empty block rows |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for f in split_rows:
    lines.append(f"| {f['E']} | {f['bulk']} x {f['E']} | {f['max']} | {f['busy']} | "
                 f"{f['overflow']} | {f['tiles']} of {f['tile']} | {f['empty']} |")
  return "\n".join(lines) + "\n"


def main():
  meta = {"date": datetime.date.today().isoformat(), "load_before": loadavg()}
  t0 = time.perf_counter()
  fb = fwd_bwd_table()
  gm = gemm_table()
  sp = [block_facts(E) for E in EXPERTS]
  text = render(meta, fb, gm, sp, time.perf_counter() - t0)
  print(text)
  if args.output:
    write_section(args.output, SECTION, text)
    print(f"wrote the section to {args.output}")


if __name__ == "__main__":
  main()
