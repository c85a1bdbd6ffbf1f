"""MoE layer microbenchmark: forward+backward time of the MoE layer vs a dense SwiGLU FFN doing the
same active FLOPs (hidden width K*F), per dispatch strategy, plus the Hugging Face Mixtral sparse
MoE block vs a PyTorch dense FFN when torch and transformers are importable.

    python experiments/bench_moe_layer.py            # full run (~15 min on the 2-core machine)
    python experiments/bench_moe_layer.py --quick    # small shapes, smoke test

Each measurement is jit(value_and_grad(sum of output)) w.r.t. the input and all weights, f32, CPU,
block_until_ready; after a warm-up, MoE and dense calls alternate and every ratio is the median
of the per-pair ratios, so that load from other processes on a shared machine hits both sides
alike. Wall time is the headline; CPU time of this process is reported beside it as a check that
is less sensitive to other processes. The MoE time includes the router, the routing and the
layer's metrics (the whole `moe.layer.modules.MoeLayer`).

Large [E, D, F] gradient buffers are freshly allocated on every call; with glibc's defaults each
such buffer is mmap'ed and page-faulted in again every step, which costs more than the matmuls
at E=256. The script therefore re-executes itself with glibc told to keep freed memory
(MALLOC_MMAP_MAX_=0 etc., the same for the JAX and PyTorch and dense and MoE runs) unless
--system-malloc is given. The results go to the "MoE layer microbenchmark" section of
BENCHMARKS.md (only that section is rewritten).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

from bench_common import ROOT, command_line, loadavg, machine, versions, write_section

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000",
              "MALLOC_TOP_PAD_": "1000000000"}
SECTION = "## MoE layer microbenchmark"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes and repeats: a smoke run")
  p.add_argument("--repeats", type=int, default=None, help="timed pairs per entry (default 5)")
  p.add_argument("--no-torch", action="store_true", help="skip the Hugging Face Mixtral rows")
  p.add_argument("--no-scaling", action="store_true", help="skip the scaling tables")
  p.add_argument("--experts", default=None,
                 help="comma-separated E values of the ratio table (default 8,64,256; '' = none)")
  p.add_argument("--system-malloc", action="store_true", help="keep glibc's malloc defaults")
  p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"),
                 help="markdown file whose section is rewritten ('' to skip)")
  p.add_argument("--save-json", default="", help="also write the raw results to this file")
  p.add_argument("--from-json", default="",
                 help="re-render the section from a --save-json file instead of measuring")
  return p.parse_args(argv)


def maybe_reexec(args):
  if args.from_json or args.system_malloc or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
    return
  env = dict(os.environ, **MALLOC_ENV)
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


args = parse_args()
maybe_reexec(args)
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
# Timing


def timed(fn):
  """(wall seconds, CPU seconds of this process) of one call, results ready."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def race(fns: dict, repeats: int, warmup: int = 1):
  """Runs the callables in turn `repeats` times after `warmup` rounds; {name: [(wall, cpu)]}."""
  for _ in range(warmup):
    for f in fns.values():
      f()
  out = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      out[name].append(timed(f))
  return out


def summary(moe_times, dense_times):
  """Median wall ms of each side, median per-pair wall ratio and CPU-time ratio."""
  wall_ratio = statistics.median(m[0] / d[0] for m, d in zip(moe_times, dense_times))
  cpu_ratio = statistics.median(m[1] / d[1] for m, d in zip(moe_times, dense_times))
  return {"moe_ms": 1e3 * statistics.median(m[0] for m in moe_times),
          "dense_ms": 1e3 * statistics.median(d[0] for d in dense_times),
          "ratio": wall_ratio, "cpu_ratio": cpu_ratio}


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
  resolved = dispatch.resolve_strategy(strategy, capacity, jax.default_backend())
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
  try:
    import importlib
    for name in ("torch", "transformers", "transformers.models.mixtral.modeling_mixtral"):
      importlib.import_module(name)
    return hasattr(sys.modules["transformers.models.mixtral.modeling_mixtral"],
                   "MixtralSparseMoeBlock")
  except Exception:  # noqa: BLE001 - any import problem means "not available"
    return False


def torch_steps(T, E):
  import torch
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                         num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=16, router_jitter_noise=0.0)
  block = MixtralSparseMoeBlock(config).train()
  for p in block.parameters():  # the block's tensors are created uninitialized
    torch.nn.init.normal_(p, std=0.02)
  H = K * F
  dense = torch.nn.ModuleDict({"w_in": torch.nn.Linear(D, H, bias=False),
                               "w_gate": torch.nn.Linear(D, H, bias=False),
                               "w_out": torch.nn.Linear(H, D, bias=False)}).train()
  x = torch.randn(1, T, D)

  def moe_step():
    xi = x.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    block(xi).sum().backward()

  def dense_step():
    xi = x.clone().requires_grad_(True)
    dense.zero_grad(set_to_none=True)
    h = torch.nn.functional.silu(dense["w_gate"](xi)) * dense["w_in"](xi)
    dense["w_out"](h).sum().backward()

  impl = getattr(config, "_experts_implementation", None) or "eager"
  return moe_step, dense_step, impl


# ----------------------------------------------------------------------------------------------
# Tables


def fmt_row(cells):
  return "| " + " | ".join(str(c) for c in cells) + " |"


def ratio_table(T, experts, repeats, with_torch):
  """Rows: (E, implementation, moe ms, dense ms, ratio, cpu ratio)."""
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
    if with_torch:
      moe, dense_t, impl = torch_steps(T, E)
      times = race({"dense": dense_t, "moe": moe}, repeats)
      s = summary(times["moe"], times["dense"])
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
  env = "" if meta["system_malloc"] else " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
  cmd = meta["command"]
  out = [SECTION, "",
         f"Measured {meta['date']} on {meta['machine']}; {meta['versions']}.",
         f"Command: `{cmd.strip()}` (it re-executes itself with `{env.strip() or 'no env change'}`;"
         f" see the script's docstring). Load average before/after: {load_before} / {load_after};"
         f" the machine is shared, so ratios (interleaved pairs) mean more than absolute times."
         f" Total {wall_s / 60:.1f} min.", "",
         f"Forward+backward (jit of value_and_grad of the output sum w.r.t. input and all weights),"
         f" f32, T={T} tokens, D={D}, F={F}, K={K}. Dense = SwiGLU FFN of hidden width K*F="
         f"{K * F} in the same framework, timed in alternation with the MoE. Ratio = median over "
         f"pairs of MoE wall time / dense wall time; CPU ratio = the same with this process's CPU "
         f"time. JAX rows time the whole `MoeLayer` (router, routing, metrics, experts). The HF rows"
         f" run in the same process under the same allocator setting, which slows PyTorch's MoE"
         f" block somewhat (run with --system-malloc to compare).", "",
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
          "system_malloc": args.system_malloc, "date": datetime.date.today().isoformat(),
          "machine": machine(),
          "versions": versions(("torch", "transformers") if torch_available() else ())}
  load_before = loadavg()
  if args.quick:
    T, experts, repeats = 512, (4, 16), args.repeats or 2
    t_points = [(t, 4) for t in (256, 512, 1024)]
    e_points = [(512, e) for e in (4, 8, 16)]
  else:
    T, experts, repeats = 8192, (8, 64, 256), args.repeats or 5
    t_points = [(t, 8) for t in (4096, 8192, 16384, 32768, 65536)]
    e_points = [(8192, e) for e in (8, 32, 64, 128, 256)]
  if args.experts is not None:
    experts = tuple(int(e) for e in args.experts.split(",") if e.strip())
  with_torch = not args.no_torch and torch_available()
  if not args.no_torch and not with_torch:
    print("torch/transformers not importable: skipping the Hugging Face Mixtral rows")
  print(fmt_row(["E", "implementation", "MoE ms", "dense ms", "ratio", "CPU ratio"]), flush=True)
  ratio_rows = ratio_table(T, experts, repeats, with_torch)
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
