"""Sections 2 and 3 of experiments/accelerator_check.py: the MoE layer's dispatch strategies.

Section 2 checks every strategy's output and gradients against 'reference'; section 3 times the
whole bf16 MoeLayer's forward+backward per strategy against a dense FFN at large shapes.
A strategy whose kernel the backend lacks (`moe.layer.dispatch.unavailable`: `megablox` off
TPU and CPU) is skipped in both with that reason; `megablox` is timed on TPU only (on CPU it
runs in interpret mode: checked in section 2, not a speed).
"""

from __future__ import annotations

import contextlib
import math
import time

from accel_common import (DATASHEET_BF16_TFLOPS, TOLERANCE, block, compile_timed,
                          device_bytes_limit, measured_peak, needed_bytes, program_facts,
                          time_calls)


# ----------------------------------------------------------------------------------------------
# 2. Correctness of every dispatch strategy against 'reference'


GRAD_NAMES = ("x", "w_in", "w_gate", "w_out", "combine_weights")


def corr_inputs(c: dict, seed: int = 0):
  """x_GTD (f32), weights, projection, router logits and padding mask for section 2."""
  import jax
  import jax.numpy as jnp
  G, T, D, F, E = c["G"], c["T"], c["D"], c["F"], c["E"]
  k = jax.random.split(jax.random.PRNGKey(seed), 7)
  x_GTD = jax.random.normal(k[0], (G, T, D), jnp.float32)
  w_in_EDF = jax.random.normal(k[1], (E, D, F)) / math.sqrt(D)
  w_gate_EDF = jax.random.normal(k[2], (E, D, F)) / math.sqrt(D)
  w_out_EFD = jax.random.normal(k[3], (E, F, D)) / math.sqrt(F)
  proj_GTD = jax.random.normal(k[4], (G, T, D), jnp.float32)
  # Expert 0 is favoured so that capacity 1.25 really drops assignments; 5% padding tokens.
  logits_GTE = jax.random.normal(k[5], (G, T, E)).at[..., 0].add(0.7)
  mask_GT = jax.random.uniform(k[6], (G, T)) >= 0.05
  return x_GTD, (w_in_EDF, w_gate_EDF, w_out_EFD), proj_GTD, logits_GTE, mask_GT


def value_and_grads(strategy: str):
  """jit of (output, grads of sum(output * proj) w.r.t. x, w_in, w_gate, w_out, combine weights)."""
  import jax
  import jax.numpy as jnp
  from moe.layer import dispatch

  def loss(x, w_in, w_gate, w_out, cw, routing, proj):
    y = dispatch.apply_experts(x, routing.replace(combine_weights=cw), w_in, w_gate, w_out,
                               activation="swiglu", strategy=strategy)
    return jnp.sum(y.astype(jnp.float32) * proj), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def run_strategy(strategy, x, weights, routing, proj):
  """{'out': ..., 'grad_<name>': ...} as float64 numpy arrays."""
  import numpy as np
  (_, y), grads = value_and_grads(strategy)(x, *weights, routing.combine_weights, routing, proj)
  out = {"out": y}
  out.update({f"grad_{n}": g for n, g in zip(GRAD_NAMES, grads)})
  return {k: np.asarray(np.asarray(v, np.float32), np.float64) for k, v in out.items()}


def rel_errors(got: dict, want: dict) -> dict:
  import numpy as np
  errs = {}
  for k, b in want.items():
    denom = float(np.linalg.norm(b))
    errs[k] = float(np.linalg.norm(got[k] - b) / denom) if denom > 0 else float("nan")
  return errs


def section_correctness(ctx, rec: dict) -> None:
  """Each strategy vs 'reference' at the same dtype; f32 under 'highest' matmul precision."""
  import jax.numpy as jnp
  from moe.layer import routing as routing_lib
  c = ctx.cfg["corr"]
  rec["shape"] = dict(c, tokens=c["G"] * c["T"])
  rec["tolerance"] = TOLERANCE
  rec["method"] = ("dispatch.apply_experts (swiglu) with routing_lib.top_k_routing on random "
                   "logits; loss sum(y * random projection); each strategy vs 'reference' at "
                   "the same dtype; f32 under jax.default_matmul_precision('highest')")
  x, weights, proj, logits, mask = corr_inputs(c)
  rec["rows"] = rows = []
  rec["noise_floor_bf16_vs_f32"] = {}
  for label, cf in (("cf 1.25", 1.25), ("dropless", None)):
    cap = routing_lib.capacity_for(c["T"], c["E"], c["K"], cf, 4)
    routing = routing_lib.top_k_routing(logits, num_selected=c["K"], capacity=cap,
                                        padding_mask=mask)
    dropped = float(jnp.mean((routing.slot < 0) & mask[..., None]))
    run = lambda s, d, r=routing: run_strategy(s, x.astype(d), weights, r, proj)
    refs = corr_routing(ctx, rows, run, label, cap, dropped)
    if len(refs) == 2:
      rec["noise_floor_bf16_vs_f32"][label] = rel_errors(refs["bfloat16"], refs["float32"])
    ctx.save()
  rec["passed"] = sum(r.get("pass") is True for r in rows)
  rec["checked"] = sum(r.get("pass") is not None for r in rows)


def corr_routing(ctx, rows, run, label, cap, dropped) -> dict:
  """Rows of every strategy at both dtypes for one routing; returns the reference results."""
  import jax
  from moe.layer import dispatch
  refs = {}
  for dtype in ("float32", "bfloat16"):
    with (jax.default_matmul_precision("highest") if dtype == "float32"
          else contextlib.nullcontext()):
      if ctx.left("correctness") >= 1:
        refs[dtype] = run("reference", dtype)
      for strategy in dispatch.STRATEGIES:
        if strategy != "reference":
          rows.append(corr_row(ctx, strategy, dtype, label, cap, dropped, refs.get(dtype),
                               lambda s=strategy, d=dtype: run(s, d),
                               refs.get("float32") if dtype == "bfloat16" else None))
  return refs


def corr_row(ctx, strategy, dtype, label, cap, dropped, ref, run, ref_f32=None) -> dict:
  """One strategy at one dtype and routing vs `ref`; bf16 rows are also compared with the f32
  reference (`ref_f32`), which shows how far each is from the exact result."""
  from moe.layer import dispatch
  row = {"strategy": strategy, "dtype": dtype, "routing": label, "capacity": cap,
         "dropped_fraction": dropped}
  if cap is None and strategy in dispatch.CAPACITY_ONLY:
    row["skipped"] = "capacity only"
    return row
  if dispatch.unavailable(strategy):
    row["skipped"] = dispatch.unavailable(strategy)
    return row
  if ref is None or ctx.left("correctness") < 1:
    row["skipped"] = "time budget"
    return row
  try:
    t0 = time.perf_counter()
    got = run()
    row["errors"] = errs = rel_errors(got, ref)
    if ref_f32 is not None:
      row["max_error_vs_f32_reference"] = max(rel_errors(got, ref_f32).values())
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["max_error"] = worst = max(errs.values())
    row["pass"] = bool(all(math.isfinite(v) for v in errs.values())
                       and worst <= TOLERANCE[dtype])
    print(f"  {strategy:9s} {dtype:8s} {label:8s} max rel err {worst:.2e} "
          f"{'pass' if row['pass'] else 'FAIL'}", flush=True)
  except Exception as e:  # noqa: BLE001
    row["error"] = ctx.error(f"correctness/{strategy}/{dtype}/{label}", e)
    row["pass"] = False
  return row


# ----------------------------------------------------------------------------------------------
# 3. MoE layer benchmark at large shapes


def active_flops(s: dict) -> float:
  """Expert FLOPs of one forward+backward: 3 matmuls x 2*T*K*D*F forward, x3 with backward."""
  return 18.0 * s["T"] * s["K"] * s["D"] * s["F"]


def bench_entries(gpu: bool):
  """(strategy, capacity factor, group size key, extra flag) in priority order: if the time
  box cuts section 3 short, the entries that decide what 'auto' should pick ran first."""
  entries = [("gather", 1.25, None, None), ("ragged", None, None, None),
             ("megablox", None, None, None), ("grouped", 1.25, None, None),
             ("ragged", 1.25, None, None), ("megablox", 1.25, None, None),
             ("grouped", None, None, None), ("einsum", 1.25, "einsum_group", None),
             ("reference", 1.25, None, None)]
  if gpu:  # jax's optional Pallas/Triton lowering of ragged_dot (a config flag, not a strategy)
    entries.append(("ragged", None, None, "triton"))
  return entries


def estimate_bytes(s: dict, strategy: str, cap, groups: int) -> float:
  """Rough upper estimate of the device bytes of one fwd+bwd step of the bf16 MoeLayer."""
  T, D, F, E, K = s["T"], s["D"], s["F"], s["E"], s["K"]
  weights = 3 * E * D * F * (4 + 4 + 2 + 2)  # f32 params and grads, bf16 copies and grads
  rows = {"reference": T * E, "einsum": E * groups * (cap or 0), "gather": E * groups * (cap or 0),
          "grouped": T * K + E * 256, "ragged": T * K, "megablox": T * K + 512}[strategy]
  per_row = (2 * D + 3 * F) * 2 * 2  # x, y, h_in, h_gate, act rows in bf16, saved + backward
  extra = 0.0
  if strategy == "einsum":  # one-hot dispatch/combine [G, T/G, E, C] (f32 + bf16), fwd + bwd
    extra = 2 * T * E * cap * (4 + 2)
  tokens = 8 * T * D * 2 + T * K * 64  # x, y, grads, routing arrays
  return float(weights + rows * per_row + extra + tokens)


def estimate_seconds(s: dict, strategy: str, cap, groups: int, peak_tflops: float) -> float:
  """FLOPs the strategy may really compute / (40% of the peak): 'reference' runs every expert
  on every token, einsum and gather fill E*C rows per group, einsum adds its dispatch/combine
  einsums, and XLA on GPU may rewrite ragged_dot's weight gradients (3 of the 9 matmuls) to a
  dense dot over all E experts."""
  flops = active_flops(s)
  if strategy == "reference":
    flops *= s["E"] / s["K"]
  elif strategy in ("einsum", "gather"):
    flops *= s["E"] * groups * cap / (s["T"] * s["K"])
  elif strategy == "ragged":
    flops *= (6 + 3 * s["E"]) / 9
  if strategy == "einsum":
    flops += 3 * 2 * 2 * s["T"] * s["E"] * cap * s["D"]
  return flops / (0.4 * peak_tflops * 1e12)


def bench_data(s: dict, seed: int = 0):
  """x [1, T, D] bf16, MoE layer params (random, f32, from eval_shape: no init compile) and
  dense SwiGLU params of width K*F."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from moe.layer.config import MoeConfig
  from moe.layer.modules import MoeLayer
  T, D, F, E, K = s["T"], s["D"], s["F"], s["E"], s["K"]
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
  x_1TD = jax.random.normal(next(keys), (1, T, D), jnp.float32).astype(jnp.bfloat16)
  layer = MoeLayer(MoeConfig(num_experts=E, num_selected=K, expert_hidden=F), dtype=jnp.bfloat16)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x_1TD[:, :8],
                                                           train=True))["params"])
  params = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, jnp.float32)
                        / math.sqrt(a.shape[-2]), shapes)
  H = K * F
  dense = {"w_in": jax.random.normal(next(keys), (D, H)) / math.sqrt(D),
           "w_gate": jax.random.normal(next(keys), (D, H)) / math.sqrt(D),
           "w_out": jax.random.normal(next(keys), (H, D)) / math.sqrt(H)}
  return x_1TD, params, dense


def moe_step(s: dict, strategy: str, cf, group_size):
  """jit(value_and_grad) of the bf16 MoeLayer's output sum w.r.t. (x, params)."""
  import jax
  import jax.numpy as jnp
  from moe.layer.config import MoeConfig
  from moe.layer.modules import MoeLayer
  cfg = MoeConfig(num_experts=s["E"], num_selected=s["K"], expert_hidden=s["F"],
                  capacity_factor=cf, dispatch=strategy, group_size=group_size)
  layer = MoeLayer(cfg, dtype=jnp.bfloat16)

  def loss(x, p):
    return jnp.sum(layer.apply({"params": p}, x, train=True).astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def dense_step():
  """jit(value_and_grad) of a bf16 SwiGLU FFN (f32 params cast to bf16, like the experts)."""
  import jax
  import jax.numpy as jnp

  def loss(x_1TD, p):
    x_TD = x_1TD[0]
    w = {k: v.astype(jnp.bfloat16) for k, v in p.items()}
    h_TH = jax.nn.silu(x_TD @ w["w_gate"]) * (x_TD @ w["w_in"])
    return jnp.sum((h_TH @ w["w_out"]).astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def time_step(jitted, args, reps: int, limit_bytes):
  """Compiles, checks the compiled memory against the device, warms up and times one step."""
  compiled, compile_s, mem = compile_timed(jitted, *args)
  row = {"compile_s": round(compile_s, 2)}
  row.update(program_facts(compiled))
  if mem:
    row["compiled_gb"] = round(needed_bytes(mem) / 1e9, 2)
    row["temp_gb"] = round(mem["temp"] / 1e9, 2)
    if limit_bytes and needed_bytes(mem) > 0.9 * limit_bytes:
      row["skipped"] = f"compiled program needs {row['compiled_gb']:.0f} GB"
      return row
  t0 = time.perf_counter()
  block(compiled(*args))
  first = time.perf_counter() - t0
  row["first_call_s"] = round(first, 3)
  reps = reps if first < 1.0 else max(1, min(reps, 2))
  row["ms"] = 1e3 * time_calls(lambda: compiled(*args), reps)
  row["reps"] = reps
  return row


def add_rates(row: dict, s: dict, peak: float) -> None:
  """XLA's FLOPs over the active FLOPs, achieved TFLOP/s and % of `peak` of a timed row."""
  if row.get("xla_flops"):
    row["xla_flops_over_active"] = row["xla_flops"] / active_flops(s)
  if "ms" in row:
    row["tflops"] = active_flops(s) / (row["ms"] / 1e3) / 1e12
    row["pct_peak"] = 100.0 * row["tflops"] / peak


def shape_name(s: dict) -> str:
  return f"T={s['T']} D={s['D']} F={s['F']} E={s['E']} K={s['K']}"


def not_timed(strategy: str) -> str | None:
  """Why section 3 does not time `strategy` on this backend, or None."""
  import jax
  from moe.layer import dispatch
  if dispatch.unavailable(strategy):
    return dispatch.unavailable(strategy)
  if strategy == "megablox" and jax.default_backend() != "tpu":
    return "interpret mode off TPU: checked in section 2, not timed"
  return None


def bench_moe(ctx, s, entry, data, peak, limit) -> dict:
  """One MoE row of section 3 (estimates, skip reasons, timing)."""
  from moe.layer import routing as routing_lib
  strategy, cf, group_key, flag = entry
  group = ctx.cfg[group_key] if group_key else None
  t_group = min(group, s["T"]) if group else s["T"]
  cap = routing_lib.capacity_for(t_group, s["E"], s["K"], cf, 4)
  groups = s["T"] // t_group
  row = {"shape": shape_name(s), "strategy": strategy, "routing": "dropless" if cf is None
         else f"cf {cf}", "capacity": cap, "variant": ", ".join(
             ([f"groups of {t_group}"] if group else []) + (["pallas triton"] if flag else []))}
  row["est_gb"] = round(estimate_bytes(s, strategy, cap, groups) / 1e9, 2)
  row["est_s"] = round(estimate_seconds(s, strategy, cap, groups, peak), 3)
  if not_timed(strategy):
    row["skipped"] = not_timed(strategy)
  elif flag == "triton" and not triton_lowering_shipped():
    row["skipped"] = ("this jax wheel lacks jax._src.lax.pallas_lowerings, which the flag "
                      "imports (jax-ml/jax#40888)")
  elif row["est_gb"] > ctx.args.mem_limit_gb:
    row["skipped"] = f"estimated {row['est_gb']:.0f} GB > {ctx.args.mem_limit_gb:.0f} GB"
  elif row["est_s"] > 2.0:
    row["skipped"] = f"estimated {row['est_s']:.1f} s per step (computes {strategy} FLOPs)"
  elif ctx.left("layer_bench") < 15 + 8 * row["est_s"]:
    row["skipped"] = "time budget"
  if "skipped" in row:
    print(f"  {row['shape']} {strategy} {row['routing']} {row['variant']}: skipped "
          f"({row['skipped']})", flush=True)
    return row
  x, params, _ = data
  try:
    with ragged_triton(flag == "triton"):
      row.update(time_step(moe_step(s, strategy, cf, group), (x, params),
                           ctx.cfg["bench_reps"], limit))
    add_rates(row, s, peak)
    print(f"  {row['shape']} {strategy} {row['routing']} {row['variant']}: "
          f"{row.get('ms', float('nan')):.1f} ms, compile {row['compile_s']:.1f} s "
          f"{row.get('skipped', '')}", flush=True)
  except Exception as e:  # noqa: BLE001
    row["error"] = ctx.error(f"layer_bench/{row['shape']}/{strategy}/{row['routing']}", e)
  return row


def triton_lowering_shipped() -> bool:
  """Whether the installed jax has the module its Pallas/Triton ragged_dot flag imports (the
  released wheels 0.10.0-0.11.2 do not: the flag then fails every call, jax-ml/jax#40888)."""
  import importlib.util
  try:
    return importlib.util.find_spec("jax._src.lax.pallas_lowerings") is not None
  except ModuleNotFoundError:
    return False


@contextlib.contextmanager
def ragged_triton(on: bool):
  """jax's Pallas/Triton lowering of ragged_dot on GPU, switched on for the block."""
  if not on:
    yield
    return
  import jax
  name = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
  old = getattr(jax.config, name)
  jax.config.update(name, True)
  try:
    yield
  finally:
    jax.config.update(name, old)


def bench_dense(ctx, s, data, peak, limit) -> dict:
  """The dense SwiGLU row of section 3 at shape `s` (same FLOPs as the active experts)."""
  x, _, dense = data
  row = {"shape": shape_name(s), "strategy": "dense", "routing": "-",
         "variant": f"SwiGLU width K*F={s['K'] * s['F']}"}
  if ctx.left("layer_bench") < 15:
    row["skipped"] = "time budget"
    return row
  try:
    row.update(time_step(dense_step(), (x, dense), ctx.cfg["bench_reps"], limit))
    add_rates(row, s, peak)
    if "ms" in row:
      print(f"  {row['shape']} dense: {row['ms']:.1f} ms", flush=True)
  except Exception as e:  # noqa: BLE001
    row["error"] = ctx.error(f"layer_bench/{row['shape']}/dense", e)
  return row


def section_layer_bench(ctx, rec: dict) -> None:
  """MoE layer fwd+bwd per strategy vs dense at the configured large shapes (bf16)."""
  import jax
  from moe.layer import dispatch
  from moe.layer import routing as routing_lib
  gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  peak = measured_peak(ctx) or (0.7 * DATASHEET_BF16_TFLOPS if gpu else 0.1)
  limit = device_bytes_limit()
  rec.update(peak_used_tflops=peak, bytes_limit=limit, mem_limit_gb=ctx.args.mem_limit_gb,
             flops_formula="18*T*K*D*F (3 matmuls x 2*T*K*D*F forward, x3 forward+backward; "
                           "router, routing and combine not counted)",
             method="jit(value_and_grad) of sum(MoeLayer output) w.r.t. input and params, bf16, "
                    "one routing group of T tokens unless noted, median of "
                    f"{ctx.cfg['bench_reps']} calls after a warm-up call")
  backend = jax.default_backend()
  rec["auto_table"] = {k: list(v) for k, v in dispatch.AUTO.items()}
  rec["auto"] = {}
  shapes, data = ctx.cfg["bench_shapes"], {}
  for s in shapes:
    cap = routing_lib.capacity_for(s["T"], s["E"], s["K"], 1.25, 4)
    rec["auto"][shape_name(s)] = {"cf 1.25": dispatch.resolve_strategy("auto", cap, backend),
                                  "dropless": dispatch.resolve_strategy("auto", None, backend)}
  rec["rows"] = rows = []
  for s in shapes:
    data[shape_name(s)] = bench_data(s)
    rows.append(bench_dense(ctx, s, data[shape_name(s)], peak, limit))
  for entry in bench_entries(gpu):
    for s in shapes:
      rows.append(bench_moe(ctx, s, entry, data[shape_name(s)], peak, limit))
      dense = next((r for r in rows if r["shape"] == shape_name(s) and r["strategy"] == "dense"
                    and "ms" in r), None)
      if dense and "ms" in rows[-1]:
        rows[-1]["ratio"] = rows[-1]["ms"] / dense["ms"]
      ctx.save()
  rec["fastest"] = fastest(rows)


def fastest(rows) -> dict:
  """{shape: {routing: strategy}}: the fastest plain strategy (no group size, no flag)."""
  best = {}
  for r in rows:
    if r["strategy"] == "dense" or r.get("variant") or "ms" not in r:
      continue
    cur = best.setdefault(r["shape"], {}).get(r["routing"])
    if cur is None or r["ms"] < cur[1]:
      best[r["shape"]][r["routing"]] = (r["strategy"], r["ms"])
  return {shape: {k: v[0] for k, v in d.items()} for shape, d in best.items()}
