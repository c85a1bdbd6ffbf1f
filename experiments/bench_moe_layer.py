"""MoE layer microbenchmark: forward+backward time of the MoE layer vs a dense SwiGLU FFN doing the
same active FLOPs (hidden width K*F), per dispatch strategy, plus the Hugging Face Mixtral sparse
MoE block vs a PyTorch dense FFN when torch and transformers are importable.

    python experiments/bench_moe_layer.py            # full run (~30 min on the 2-core machine)
    python experiments/bench_moe_layer.py --smoke    # tiny shapes; writes nothing without --output

Each measurement is jit(value_and_grad(sum of output)) w.r.t. the input and all weights, f32, CPU,
block_until_ready; after a warm-up, MoE and dense calls alternate and every ratio is the median
of the per-pair ratios, so that load from other processes on a shared machine hits both sides
alike. Wall time is the headline; the CPU time of the process that ran the row is reported beside
it as a check that is less sensitive to other processes. The MoE time includes the router, the routing and the
layer's metrics (the whole `moe.layer.modules.MoeLayer`).

Conditions: the JAX rows run in this process under exactly a training run's conditions: before
JAX is imported it applies `moe.allocator` as launch.py does (glibc's malloc keeps freed memory;
`MOE_SYSTEM_MALLOC=1` keeps the defaults, for the trainer and this script alike). Each PyTorch
row runs in its own process (experiments/bench_moe_torch.py) under PyTorch's own defaults: no
MALLOC_* variables, no mallopt, PyTorch's default allocator, os.cpu_count() threads. The header of
the section records both. The results go to the "MoE layer microbenchmark" section of
BENCHMARKS.md (only that section is rewritten).
"""

from __future__ import annotations

import argparse
import datetime
import json
import importlib.util
import os
import subprocess
import sys
import time

from bench_common import (ROOT, apply_allocator, command_line, loadavg, machine, race, summary,
                          versions, write_section)

SECTION = "## MoE layer microbenchmark"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                 help="tiny shapes and repeats: a smoke run (writes BENCHMARKS.md only when "
                 "--output is given)")
  p.add_argument("--repeats", type=int, default=None, help="timed pairs per entry (default 5)")
  p.add_argument("--no-torch", action="store_true", help="skip the Hugging Face Mixtral rows")
  p.add_argument("--no-scaling", action="store_true", help="skip the scaling tables")
  p.add_argument("--experts", default=None,
                 help="comma-separated E values of the ratio table (default 8,64,256; '' = none)")
  p.add_argument("--output", default=None,
                 help="markdown file whose section is rewritten ('' to skip; default "
                 "BENCHMARKS.md, none with --smoke)")
  p.add_argument("--save-json", default="", help="also write the raw results to this file")
  p.add_argument("--from-json", default="",
                 help="re-render the section from a --save-json file instead of measuring")
  args = p.parse_args(argv)
  if args.output is None:
    args.output = "" if args.smoke else os.path.join(ROOT, "BENCHMARKS.md")
  return args


args = parse_args()
ALLOCATOR = apply_allocator()  # a training run's malloc setting (launch.py's), before JAX starts
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe.layer import dispatch
from moe.layer import routing as routing_lib  # noqa: E402
from moe.layer.config import MoeConfig  # noqa: E402

try:
  from moe.layer.modules import MoeLayer  # noqa: E402
except ImportError:  # the layer not written yet: time router + routing + apply_experts directly
  MoeLayer = None

D, F, K, CF = 256, 1024, 2, 1.25


# ----------------------------------------------------------------------------------------------
# JAX


def jax_dense_step(T, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (1, T, D), jnp.float32)
  H = K * F
  params = {"w_in": jax.random.normal(k[1], (D, H)) / np.sqrt(D),
            "w_gate": jax.random.normal(k[2], (D, H)) / np.sqrt(D),
            "w_out": jax.random.normal(k[3], (H, D)) / np.sqrt(H)}

  def loss(x, p):
    x = x.reshape(T, D)  # 2-D matmuls: a [1, T, D] operand sends the weight gradients (two
    # contracted axes) down a much slower XLA CPU path, which would flatter the MoE ratio
    return jnp.sum((jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_in"])) @ p["w_out"])

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda: jax.block_until_ready(step(x, params))


def jax_moe_step(T, E, capacity_factor, strategy, group_size=None, seed=0):
  """One fwd+bwd step of the MoE layer; returns (callable, resolved strategy name)."""
  cfg = MoeConfig(num_experts=E, num_selected=K, expert_hidden=F, capacity_factor=capacity_factor,
                  dispatch=strategy, group_size=group_size)
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(k[0], (1, T, D), jnp.float32)
  t = T if group_size is None else group_size
  capacity = routing_lib.capacity_for(t, E, K, capacity_factor, cfg.min_capacity)
  rows = None if capacity is None else capacity * (T // t)  # G*C rows per expert
  resolved = dispatch.resolve_strategy(strategy, capacity, jax.default_backend(), rows)
  if MoeLayer is not None:
    layer = MoeLayer(cfg)
    params = layer.init(k[1], x, train=True)["params"]

    def loss(x, p):
      return jnp.sum(layer.apply({"params": p}, x, train=True))
  else:
    params = {"router": jax.random.normal(k[1], (D, E)) / np.sqrt(D),
              "w_in": jax.random.normal(k[2], (E, D, F)) / np.sqrt(D),
              "w_gate": jax.random.normal(k[3], (E, D, F)) / np.sqrt(D),
              "w_out": jax.random.normal(k[4], (E, F, D)) / np.sqrt(F)}

    def loss(x, p):
      x_GTD = x.reshape(-1, t, D)
      r = routing_lib.top_k_routing(x_GTD @ p["router"], num_selected=K, capacity=capacity)
      return jnp.sum(dispatch.apply_experts(x_GTD, r, p["w_in"], p["w_gate"], p["w_out"],
                                            activation="swiglu", strategy=strategy))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return (lambda: jax.block_until_ready(step(x, params))), resolved


# ----------------------------------------------------------------------------------------------
# PyTorch / Hugging Face Mixtral


def torch_available():
  """torch and transformers installed (not imported here: they run in their own processes)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def torch_row(T, E, repeats):
  """The Hugging Face Mixtral row at E experts, measured by experiments/bench_moe_torch.py in a
  process of its own under PyTorch's defaults; (summary, implementation, versions) or None."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_moe_torch.py")
  out = subprocess.run([sys.executable, script, f"--T={T}", f"--E={E}", f"--repeats={repeats}"],
                       env=env, stdout=subprocess.PIPE, text=True, check=False)
  if out.returncode:
    print(f"HF Mixtral row at E={E} failed (exit {out.returncode}): skipped", flush=True)
    return None
  r = json.loads(out.stdout.strip().splitlines()[-1])
  return summary(r["moe"], r["dense"]), r["impl"], f"{r['versions']}, {r['threads']} threads"


# ----------------------------------------------------------------------------------------------
# Tables


def fmt_row(cells):
  return "| " + " | ".join(str(c) for c in cells) + " |"


def ratio_table(T, experts, repeats, with_torch, meta):
  """Rows: (E, implementation, summary); the PyTorch rows' versions and threads go to
  meta["torch"]."""
  rows = []
  for E in experts:
    entries = [("auto", CF, None), ("gather", CF, None), ("grouped", CF, None),
               ("einsum", CF, 512), ("auto", None, None)]
    if E <= 8:  # ragged_dot expands to dense masking on CPU: 74x at E=64 (spec), not run there
      entries.append(("ragged", None, None))
    dense = jax_dense_step(T)
    for strategy, cf, group in entries:
      moe, resolved = jax_moe_step(T, E, cf, strategy,
                                    group_size=None if group is None else min(group, T))
      name = f"JAX {strategy}" + (f" -> {resolved}" if strategy == "auto" else "")
      name += ", dropless" if cf is None else f", cf {cf}"
      if group:
        name += f", groups of {min(group, T)}"
      times = race({"dense": dense, "moe": moe}, repeats)
      s = summary(times["moe"], times["dense"])
      rows.append((E, name, s))
      print(fmt_row([E, name, f"{s['moe_ms']:.0f}", f"{s['dense_ms']:.0f}", f"{s['ratio']:.2f}",
                     f"{s['cpu_ratio']:.2f}"]), flush=True)
    row = torch_row(T, E, repeats) if with_torch else None
    if row is not None:
      s, impl, meta["torch"] = row
      name = f"HF MixtralSparseMoeBlock ({impl}), dropless"
      rows.append((E, name, s))
      print(fmt_row([E, name, f"{s['moe_ms']:.0f}", f"{s['dense_ms']:.0f}", f"{s['ratio']:.2f}",
                     f"{s['cpu_ratio']:.2f}"]), flush=True)
  return rows


def scaling_table(points, repeats):
  """Rows for the default strategy (auto, cf 1.25): (T, E, moe ms, dense ms, ratio)."""
  rows = []
  for T, E in points:
    moe, resolved = jax_moe_step(T, E, CF, "auto")
    dense = jax_dense_step(T)
    times = race({"dense": dense, "moe": moe}, repeats)
    s = summary(times["moe"], times["dense"])
    rows.append((T, E, resolved, s))
    print(fmt_row([T, E, resolved, f"{s['moe_ms']:.0f}", f"{s['dense_ms']:.0f}",
                   f"{s['ratio']:.2f}"]), flush=True)
  return rows


def render(meta, T, ratio_rows, t_rows, e_rows, load_before, load_after, wall_s):
  cmd = meta["command"]
  torch_rows = any(name.startswith("HF ") for _, name, _ in ratio_rows)
  out = [SECTION, "",
         f"Measured {meta['date']} on {meta['machine']}; {meta['versions']}.",
         f"Command: `{cmd.strip()}`. Load average before/after: {load_before} / {load_after};"
         f" the machine is shared, so ratios (interleaved pairs) mean more than absolute times."
         f" Total {wall_s / 60:.1f} min.", "",
         f"Conditions: the JAX rows run in one process under a training run's conditions"
         f" (`launch.py`'s, `moe.allocator`): {meta.get('allocator', 'not recorded')}."
         + (f" Each Hugging Face row runs in its own process (experiments/bench_moe_torch.py)"
            f" under PyTorch's own defaults: no MALLOC_* variables and no mallopt, PyTorch's"
            f" default CPU allocator, {meta.get('torch', 'torch')}." if torch_rows else ""), "",
         f"Forward+backward (jit of value_and_grad of the output sum w.r.t. input and all weights),"
         f" f32, T={T} tokens, D={D}, F={F}, K={K}. Dense = SwiGLU FFN of hidden width K*F="
         f"{K * F} in the same framework, timed in alternation with the MoE. Ratio = median over "
         f"pairs of MoE wall time / dense wall time; CPU ratio = the same with the CPU time "
         f"of the process that ran the row. JAX rows time the whole `MoeLayer` (router,"
         f" routing, metrics, experts).", "",
         fmt_row(["E", "implementation", "MoE ms", "dense ms", "ratio", "CPU ratio"]),
         fmt_row(["---"] * 6)]
  for E, name, s in ratio_rows:
    out.append(fmt_row([E, name, f"{s['moe_ms']:.0f}", f"{s['dense_ms']:.0f}",
                        f"{s['ratio']:.2f}", f"{s['cpu_ratio']:.2f}"]))
  t_title = f"Scaling with T (E={t_rows[0][1]})" if t_rows else ""
  e_title = f"Scaling with E (T={e_rows[0][0]})" if e_rows else ""
  for title, rows, key in ((t_title, t_rows, 0), (e_title, e_rows, 1)):
    if not rows:
      continue
    out += ["", f"{title}, default strategy (`auto`, cf {CF}). 'x prev' = MoE time / MoE time of"
            " the previous row; 'x prev, normalized' divides that by the same step of the dense"
            " time (removes load drift).", "",
            fmt_row(["T", "E", "strategy", "MoE ms", "dense ms", "ratio", "x prev",
                     "x prev, normalized"]), fmt_row(["---"] * 8)]
    prev = None
    for T_, E, resolved, s in rows:
      step = norm = "-"
      if prev is not None:
        step = f"{s['moe_ms'] / prev['moe_ms']:.2f}"
        norm = f"{(s['moe_ms'] / prev['moe_ms']) / (s['dense_ms'] / prev['dense_ms']):.2f}"
        if key == 1:  # the dense FFN does not depend on E: the normalized step is the ratio step
          norm = f"{s['ratio'] / prev['ratio']:.2f}"
      out.append(fmt_row([T_, E, resolved, f"{s['moe_ms']:.0f}", f"{s['dense_ms']:.0f}",
                          f"{s['ratio']:.2f}", step, norm]))
      prev = s
    if key == 1 and len(rows) > 1:
      first, last = rows[0][3], rows[-1][3]
      out.append("")
      out.append(f"E={rows[0][1]} -> E={rows[-1][1]} at fixed K: MoE time x"
                 f"{last['moe_ms'] / first['moe_ms']:.2f} (ratio x{last['ratio'] / first['ratio']:.2f}).")
  targets = target_lines(ratio_rows, t_rows, e_rows)
  if targets:
    out += ["", "Targets from the issue, checked against this run (wall-time ratio, CPU-time "
            "ratio in parentheses; a ratio target counts as reached when both meet it):", ""
            ] + targets
  return "\n".join(out) + "\n"


def _find(ratio_rows, E, prefix):
  for e, name, s in ratio_rows:
    if e == E and name.startswith(prefix):
      return s
  return None


def target_lines(ratio_rows, t_rows, e_rows):
  """The issue's targets, each checked against this run's numbers (wall ratio; CPU in parens)."""
  lines = []

  def check(what, s, limit):
    if s is None:
      return
    wall, cpu = s["ratio"] <= limit, s["cpu_ratio"] <= limit
    ok = ("reached" if wall and cpu else "NOT reached" if not (wall or cpu)
          else "reached on wall time only" if wall else "reached on CPU time only")
    lines.append(f"- {what}: {s['ratio']:.2f} (CPU {s['cpu_ratio']:.2f}) vs <= {limit}: {ok}")

  for E, limit in ((8, 1.25), (64, 1.25), (256, 1.5)):
    s = next((s for e, n, s in ratio_rows if e == E and n.startswith("JAX auto") and "cf" in n),
             None)
    check(f"default (auto, cf {CF}) at E={E}", s, limit)
  for E, limit in ((8, 1.5), (64, 1.5), (256, 2.0)):
    s = next((s for e, n, s in ratio_rows if e == E and n.startswith("JAX auto")
              and "dropless" in n), None)
    check(f"dropless (auto) at E={E}", s, limit)
    hf = _find(ratio_rows, E, "HF Mixtral")
    if s is not None and hf is not None:
      ok = "reached" if s["ratio"] < hf["ratio"] else "NOT reached"
      lines.append(f"- dropless below HF Mixtral at E={E}: {s['ratio']:.2f} vs {hf['ratio']:.2f}"
                   f" (CPU {s['cpu_ratio']:.2f} vs {hf['cpu_ratio']:.2f}): {ok}")
      # Beside the target (not a target): the absolute times, each framework's own MoE.
      lines.append(f"  (absolute, not a target: dropless MoE {s['moe_ms']:.0f} ms here vs the HF "
                   f"block's {hf['moe_ms']:.0f} ms; dense {s['dense_ms']:.0f} vs "
                   f"{hf['dense_ms']:.0f} ms)")
  for prev, cur in zip(t_rows, t_rows[1:]):
    step = cur[3]["moe_ms"] / prev[3]["moe_ms"]
    norm = step / (cur[3]["dense_ms"] / prev[3]["dense_ms"])
    ok = "reached" if 1.8 <= step <= 2.2 else "NOT reached"
    lines.append(f"- T {prev[0]} -> {cur[0]}: x{step:.2f} (dense-normalized x{norm:.2f}) vs "
                 f"1.8-2.2: {ok}")
  if len(e_rows) > 1:
    step = e_rows[-1][3]["moe_ms"] / e_rows[0][3]["moe_ms"]
    ok = "reached" if step <= 1.5 else "NOT reached"
    lines.append(f"- E {e_rows[0][1]} -> {e_rows[-1][1]} at fixed K: x{step:.2f} (ratio "
                 f"x{e_rows[-1][3]['ratio'] / e_rows[0][3]['ratio']:.2f}) vs <= 1.5: {ok}")
  return lines


def main():
  if args.from_json:
    with open(args.from_json) as f:
      r = json.load(f)
    text = render(r["meta"], r["T"], [tuple(x) for x in r["ratio_rows"]],
                  [tuple(x) for x in r["t_rows"]], [tuple(x) for x in r["e_rows"]],
                  r["load_before"], r["load_after"], r["wall_s"])
    print(text)
    if args.output:
      write_section(args.output, SECTION, text)
    return
  t0 = time.perf_counter()
  meta = {"command": command_line(),
          "allocator": ALLOCATOR, "date": datetime.date.today().isoformat(),
          "machine": machine(),
          "versions": versions()}
  load_before = loadavg()
  if args.smoke:
    T, experts, repeats = 256, (4,), args.repeats or 1
    t_points = [(t, 4) for t in (128, 256)]
    e_points = [(256, e) for e in (4, 8)]
  else:
    T, experts, repeats = 8192, (8, 64, 256), args.repeats or 5
    t_points = [(t, 8) for t in (4096, 8192, 16384, 32768, 65536)]
    e_points = [(8192, e) for e in (8, 32, 64, 128, 256)]
  if args.experts is not None:
    experts = tuple(int(e) for e in args.experts.split(",") if e.strip())
  with_torch = not args.no_torch and torch_available()
  if not args.no_torch and not with_torch:
    print("torch/transformers not installed: skipping the Hugging Face Mixtral rows")
  print(fmt_row(["E", "implementation", "MoE ms", "dense ms", "ratio", "CPU ratio"]), flush=True)
  ratio_rows = ratio_table(T, experts, repeats, with_torch, meta)
  t_rows = e_rows = []
  if not args.no_scaling:
    t_rows = scaling_table(t_points, max(3, repeats - 2))
    e_rows = scaling_table(e_points, max(3, repeats - 2))
  load_after, wall_s = loadavg(), time.perf_counter() - t0
  if args.save_json:
    with open(args.save_json, "w") as f:
      json.dump({"meta": meta, "T": T, "ratio_rows": ratio_rows, "t_rows": t_rows,
                 "e_rows": e_rows, "load_before": load_before, "load_after": load_after,
                 "wall_s": wall_s}, f, indent=1)
  text = render(meta, T, ratio_rows, t_rows, e_rows, load_before, load_after, wall_s)
  print("\n" + text)
  if args.output:
    write_section(args.output, SECTION, text)
    print(f"wrote section {SECTION!r} of {args.output}")


if __name__ == "__main__":
  main()
