"""One-shot accelerator check: peak, correctness, MoE layer speed and a ~100M-active training run.

Prepared to run ONCE on a lent GPU (one H200) within a tight device budget; every section is
time-boxed and wrapped in try/except, so one failure is recorded (one line) and the next
section still runs:

    python experiments/accelerator_check.py --out "$OUT"                  # on the GPU, < 7 min
    python experiments/accelerator_check.py --smoke --out /tmp/accel      # tiny shapes, CPU, ~1 min
    python experiments/accelerator_check.py --from-json accel_out/accelerator_check.json \\
        --output BENCHMARKS.md                                            # re-render, no JAX work

Sections, in order (see each function's docstring for the exact method):

1. device: device info, measured matmul peak (8192^3 jnp.dot, bf16 with f32 or bf16 output, and
   f32 at default and at 'highest' precision), device-to-device and host-to-device bandwidth.
2. correctness: every dispatch strategy against 'reference' (moe.layer.dispatch.apply_experts
   with a routing from moe.layer.routing.top_k_routing, as tests/layer/test_dispatch.py does),
   float32 under jax.default_matmul_precision('highest') (XLA on GPU may otherwise use TF32)
   and bfloat16, capacity factor 1.25 and dropless; relative error ||a - b|| / ||b|| of the
   output and of the gradients w.r.t. the input, the three expert weights and the combine
   weights.
3. layer_bench: the whole `moe.layer.modules.MoeLayer` in bfloat16 at T=65536, D=2048, F=1408,
   with (E=64, K=6) and (E=8, K=2): jit(value_and_grad) of the output sum w.r.t. input and
   params per strategy, vs a dense SwiGLU FFN of width K*F; achieved TFLOP/s counting the
   active expert FLOPs 18*T*K*D*F (3 matmuls * 2*T*K*D*F forward, x3 forward+backward).
   Entries whose estimated memory exceeds --mem-limit-gb, or whose compiled program does not
   fit the device, are skipped with the reason recorded.
4. train: 101 AdamW steps (moe.train.step) of a decoder-only moe.model.transformer.Transformer
   with ~100M active parameters on on-device Zipf-distributed random tokens; tokens/s, model
   FLOPs/token (6*N_active + 12*layers*d_model*seq), TFLOP/s, MFU vs the measured and the
   datasheet peak, compile time, loss at steps 0 and 100.

Everything goes under --out (default $OUT, else ./accel_out): accelerator_check.json (all raw
results, rewritten after every section, so a killed run still leaves its data) and
accelerator_check.md (the markdown section). With --output FILE the section "## Accelerator
check" of FILE is rewritten through bench_common.write_section. --budget-s (default 400)
time-boxes the run: items that would start after their section's share of the budget are
skipped, and a watchdog writes the JSON and exits if the run overshoots the budget by 15 s.

Imports only jax, flax, optax, numpy and moe.layer.{config, routing, dispatch, modules},
moe.model.{config, transformer} and moe.train.step (none of them pulls ml_collections, clu,
grain, tensorflow or sentencepiece; the run records and checks that).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types

from bench_common import ROOT, command_line, loadavg, machine, versions, write_section

T_START = time.perf_counter()

sys.path.insert(0, ROOT)

SECTION = "## Accelerator check"
JSON_NAME, MD_NAME = "accelerator_check.json", "accelerator_check.md"
DATASHEET_BF16_TFLOPS = 989.0  # H200 SXM, dense bf16 tensor core (no sparsity)
FORBIDDEN = ("ml_collections", "clu", "grain", "tensorflow", "tensorflow_datasets",
             "sentencepiece")
SECTIONS = ("device", "correctness", "layer_bench", "train")
# End of each section's share of --budget-s (fraction); section 4 needs at least TRAIN_MIN_S.
DEADLINES = {"device": 0.08, "correctness": 0.30, "layer_bench": 0.72, "train": 1.0}
TRAIN_MIN_S = 60.0

FULL = dict(
    matmul_n=8192, matmul_rounds=5, matmul_inner=10, copy_mib=1024, h2d_mib=256,
    corr=dict(G=4, T=251, D=96, F=80, E=8, K=2),
    bench_shapes=(dict(T=65536, D=2048, F=1408, E=64, K=6),
                  dict(T=65536, D=2048, F=1408, E=8, K=2)),
    bench_reps=5, einsum_group=1024,
    train=dict(vocab=32768, d_model=768, layers=12, heads=12, head_dim=64, E=8, K=2, F=832,
               seq=1024, batch=32, steps=100, lr=1e-3, warmup=10),
)
SMOKE = dict(
    matmul_n=256, matmul_rounds=3, matmul_inner=3, copy_mib=4, h2d_mib=4,
    corr=dict(G=2, T=61, D=24, F=20, E=4, K=2),
    bench_shapes=(dict(T=512, D=64, F=48, E=8, K=3),),
    bench_reps=2, einsum_group=128,
    train=dict(vocab=512, d_model=64, layers=2, heads=4, head_dim=16, E=4, K=2, F=64,
               seq=64, batch=8, steps=20, lr=3e-3, warmup=3),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT") or "accel_out",
                 help="folder for the JSON and markdown (default $OUT, else ./accel_out)")
  p.add_argument("--output", default="",
                 help="markdown file whose '## Accelerator check' section is rewritten")
  p.add_argument("--from-json", default="",
                 help="re-render the section from a saved JSON instead of measuring")
  p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, ~1 min): a smoke run")
  p.add_argument("--budget-s", type=float, default=400.0,
                 help="time box of the whole run in seconds (default 400)")
  p.add_argument("--mem-limit-gb", type=float, default=60.0,
                 help="section 3 skips entries whose estimated memory exceeds this")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated subset of {','.join(SECTIONS)}")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Run context: results, time box, incremental saving, watchdog


def one_line(e: BaseException) -> str:
  """'Type: first non-empty line of the message' (at most 300 characters)."""
  lines = [s.strip() for s in str(e).splitlines() if s.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


class Ctx:
  """The run's configuration, results and clock."""

  def __init__(self, args, cfg):
    self.args, self.cfg = args, cfg
    self.lock = threading.Lock()
    self.results = {"meta": {}, "sections": {}, "errors": []}
    os.makedirs(args.out, exist_ok=True)

  def elapsed(self) -> float:
    return time.perf_counter() - T_START

  def left(self, section: str) -> float:
    """Seconds until `section`'s share of the budget ends."""
    return DEADLINES[section] * self.args.budget_s - self.elapsed()

  def error(self, where: str, e: BaseException) -> str:
    msg = one_line(e)
    print(f"[{where}] error: {msg}", flush=True)
    with self.lock:
      self.results["errors"].append({"where": where, "error": msg,
                                     "traceback": traceback.format_exc()[-4000:]})
    return msg

  def save(self) -> None:
    """Writes the JSON (atomically) and the markdown section under --out."""
    with self.lock:
      self.results["meta"]["wall_s"] = round(self.elapsed(), 1)
      text = json.dumps(self.results, indent=1, default=str)
    path = os.path.join(self.args.out, JSON_NAME)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    with open(os.path.join(self.args.out, MD_NAME), "w") as f:
      f.write(render(json.loads(text)))


def start_watchdog(ctx: Ctx) -> None:
  """Saves what there is and exits if the run overshoots the budget by 15 s (a hung compile)."""

  def watch():
    time.sleep(max(1.0, ctx.args.budget_s + 15.0 - ctx.elapsed()))
    print(f"watchdog: {ctx.elapsed():.0f} s > budget {ctx.args.budget_s:.0f} s + 15 s; "
          "saving partial results and exiting", flush=True)
    with ctx.lock:
      ctx.results["meta"]["watchdog_exit"] = True
      for rec in ctx.results["sections"].values():
        rec.setdefault("status", "stopped by the watchdog while running")
    for _ in range(3):
      try:
        ctx.save()
        print_summary(ctx.results)
        break
      except Exception:  # noqa: BLE001 - the main thread may be mutating the results
        time.sleep(0.2)
    os._exit(3)

  threading.Thread(target=watch, daemon=True).start()


def run_section(ctx: Ctx, name: str, fn) -> None:
  """Runs one section into results['sections'][name]; never raises."""
  rec = ctx.results["sections"].setdefault(name, {})
  t0 = time.perf_counter()
  need = TRAIN_MIN_S if name == "train" else 5.0
  if name not in ctx.args.sections.split(","):
    rec["status"] = "skipped: not in --sections"
  elif ctx.left(name) < need:
    rec["status"] = f"skipped: time budget ({ctx.elapsed():.0f} s elapsed)"
  else:
    print(f"== {name} (at {ctx.elapsed():.0f} s)", flush=True)
    try:
      fn(ctx, rec)
      rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - record, then go on with the next section
      rec["status"] = "error: " + ctx.error(name, e)
  rec["seconds"] = round(time.perf_counter() - t0, 1)
  try:
    ctx.save()
  except Exception as e:  # noqa: BLE001
    ctx.error(f"{name}/save", e)


# ----------------------------------------------------------------------------------------------
# Metadata


def _run_cmd(cmd, timeout=10) -> str:
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return (out.stdout or out.stderr).strip()
  except (OSError, subprocess.SubprocessError) as e:
    return f"unavailable ({one_line(e)})"


def nvidia_smi() -> str:
  """One CSV line per GPU: name, driver, memory, SM clock now/max, power limit, temperature."""
  return _run_cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                   "clocks.max.sm,power.limit,temperature.gpu", "--format=csv,noheader"])


def gpu_packages() -> dict:
  """Versions of the installed jax/CUDA plugin, cuBLAS and cuDNN wheels."""
  found = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(("jaxlib", "jax-cuda", "jax_cuda", "nvidia-cublas", "nvidia-cudnn",
                        "nvidia-cuda-runtime", "nvidia-nccl")):
      found[name] = dist.version
  return dict(sorted(found.items()))


def collect_meta(ctx: Ctx) -> None:
  import jax
  meta = ctx.results["meta"]
  meta.update(date=datetime.date.today().isoformat(), command=command_line(),
              smoke=ctx.args.smoke, budget_s=ctx.args.budget_s, host=machine(),
              versions=versions(("optax",)), packages=gpu_packages(),
              load_before=loadavg(), nvidia_smi_before=nvidia_smi(),
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
              backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
              device_count=jax.device_count())
  meta["forbidden_modules_loaded"] = sorted(m for m in FORBIDDEN if m in sys.modules)


# ----------------------------------------------------------------------------------------------
# Timing


def block(tree):
  import jax
  return jax.block_until_ready(tree)


def time_calls(fn, rounds: int, inner: int = 1) -> float:
  """Median over `rounds` of the seconds per call of `inner` back-to-back calls (one block)."""
  per_call = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    block(out)
    per_call.append((time.perf_counter() - t0) / inner)
  return statistics.median(per_call)


def compile_timed(jitted, *args):
  """(compiled, seconds, memory dict in bytes or {}) of jitted.lower(*args).compile()."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = {}
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      mem = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
             for k in ("temp", "argument", "output", "alias", "generated_code")}
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  return compiled, seconds, mem


def needed_bytes(mem: dict) -> int:
  """Device bytes a compiled program needs: temporaries + arguments + outputs not aliased to
  (donated) arguments."""
  return mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]


def program_facts(compiled) -> dict:
  """XLA's own FLOP count of the compiled program (a while loop's body counted once) and how
  often its optimized HLO mentions cudnn / triton / ragged-dot (which kernels ragged_dot got)."""
  facts = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    facts["xla_flops"] = float(cost.get("flops", 0.0))
  except Exception:  # noqa: BLE001
    pass
  try:
    text = compiled.as_text().lower()
    facts["hlo_mentions"] = {k: text.count(k) for k in ("cudnn", "triton", "ragged-dot")}
  except Exception:  # noqa: BLE001
    pass
  return facts


def device_bytes_limit():
  import jax
  try:
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001
    return None


def measured_peak(ctx: Ctx) -> float | None:
  """The measured bf16 matmul peak (TFLOP/s) of section 1, or None."""
  return ctx.results["sections"].get("device", {}).get("peak_bf16_tflops")


# ----------------------------------------------------------------------------------------------
# 1. Device info, matmul peak, bandwidth


def matmul_tflops(n, dtype, precision, out_dtype, rounds, inner, seed=0):
  """TFLOP/s of an n^3 jnp.dot (2 n^3 FLOPs), median of `rounds` x `inner` calls after warm-up."""
  import functools
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.PRNGKey(seed))
  a_NN = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b_NN = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(functools.partial(jnp.dot, precision=precision, preferred_element_type=out_dtype))
  block(f(a_NN, b_NN))
  block(f(a_NN, b_NN))
  s = time_calls(lambda: f(a_NN, b_NN), rounds, inner)
  return 2 * n ** 3 / s / 1e12, s


def bandwidths(mib: int, h2d_mib: int, rounds: int) -> dict:
  """Device read+write bandwidth of y = 2*x (GB/s counts bytes read + written) and
  host-to-device / device-to-host copy bandwidth (jax.device_put / np.asarray)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  n = mib * 2 ** 20 // 4
  x_N = jnp.ones((n,), jnp.float32)
  double = jax.jit(lambda x: x * 2.0)
  block(double(x_N))
  s = time_calls(lambda: double(x_N), rounds, 10)
  out = {"elementwise_gbps": 2 * n * 4 / s / 1e9, "elementwise_mib": mib}
  host = np.ones((h2d_mib * 2 ** 20 // 4,), np.float32)
  dev = jax.devices()[0]
  block(jax.device_put(host, dev))
  s_h2d = time_calls(lambda: jax.device_put(host, dev), rounds)
  y = block(jax.device_put(host, dev))
  t0 = time.perf_counter()
  np.asarray(y)
  s_d2h = time.perf_counter() - t0
  out.update(h2d_gbps=host.nbytes / s_h2d / 1e9, d2h_gbps=host.nbytes / s_d2h / 1e9,
             host_mib=h2d_mib)
  return out


def section_device(ctx: Ctx, rec: dict) -> None:
  """Device facts, matmul peak in 4 variants, bandwidths."""
  import jax
  import jax.numpy as jnp
  c = ctx.cfg
  dev = jax.devices()[0]
  rec["device"] = {"platform": dev.platform, "kind": dev.device_kind,
                   "count": jax.device_count(), "bytes_limit": device_bytes_limit()}
  rec["matmul_n"] = n = c["matmul_n"]
  variants = [("bf16 x bf16 -> f32", jnp.bfloat16, None, jnp.float32),
              ("bf16 x bf16 -> bf16", jnp.bfloat16, None, None),
              ("f32, default precision", jnp.float32, None, None),
              ("f32, precision=highest", jnp.float32, "highest", None)]
  rec["matmul"] = {}
  for name, dtype, precision, out_dtype in variants:
    if ctx.left("device") < 2:
      rec["matmul"][name] = {"skipped": "time budget"}
      continue
    try:
      tflops, s = matmul_tflops(n, dtype, precision, out_dtype, c["matmul_rounds"],
                                c["matmul_inner"])
      rec["matmul"][name] = {"tflops": tflops, "ms": 1e3 * s}
      print(f"  matmul {n}^3 {name}: {tflops:.1f} TFLOP/s ({1e3 * s:.3f} ms)", flush=True)
    except Exception as e:  # noqa: BLE001
      rec["matmul"][name] = {"error": ctx.error(f"device/matmul {name}", e)}
  bf16 = [v["tflops"] for k, v in rec["matmul"].items() if k.startswith("bf16") and "tflops" in v]
  rec["peak_bf16_tflops"] = max(bf16) if bf16 else None
  rec["datasheet_bf16_tflops"] = DATASHEET_BF16_TFLOPS
  try:
    rec["bandwidth"] = bandwidths(c["copy_mib"], c["h2d_mib"], c["matmul_rounds"])
    print(f"  bandwidth: {rec['bandwidth']}", flush=True)
  except Exception as e:  # noqa: BLE001
    rec["bandwidth"] = {"error": ctx.error("device/bandwidth", e)}


# ----------------------------------------------------------------------------------------------
# 2. Correctness of every dispatch strategy against 'reference'


GRAD_NAMES = ("x", "w_in", "w_gate", "w_out", "combine_weights")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


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


def section_correctness(ctx: Ctx, rec: dict) -> None:
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
             ("grouped", 1.25, None, None), ("ragged", 1.25, None, None),
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
          "grouped": T * K + E * 256, "ragged": T * K}[strategy]
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


def shape_name(s: dict) -> str:
  return f"T={s['T']} D={s['D']} F={s['F']} E={s['E']} K={s['K']}"


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
  if row["est_gb"] > ctx.args.mem_limit_gb:
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
    if row.get("xla_flops"):
      row["xla_flops_over_active"] = row["xla_flops"] / active_flops(s)
    if "ms" in row:
      row["tflops"] = active_flops(s) / (row["ms"] / 1e3) / 1e12
      row["pct_peak"] = 100.0 * row["tflops"] / peak
    print(f"  {row['shape']} {strategy} {row['routing']} {row['variant']}: "
          f"{row.get('ms', float('nan')):.1f} ms, compile {row['compile_s']:.1f} s "
          f"{row.get('skipped', '')}", flush=True)
  except Exception as e:  # noqa: BLE001
    row["error"] = ctx.error(f"layer_bench/{row['shape']}/{strategy}/{row['routing']}", e)
  return row


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
  x, _, dense = data
  row = {"shape": shape_name(s), "strategy": "dense", "routing": "-",
         "variant": f"SwiGLU width K*F={s['K'] * s['F']}"}
  if ctx.left("layer_bench") < 15:
    row["skipped"] = "time budget"
    return row
  try:
    row.update(time_step(dense_step(), (x, dense), ctx.cfg["bench_reps"], limit))
    if row.get("xla_flops"):
      row["xla_flops_over_active"] = row["xla_flops"] / active_flops(s)
    if "ms" in row:
      row["tflops"] = active_flops(s) / (row["ms"] / 1e3) / 1e12
      row["pct_peak"] = 100.0 * row["tflops"] / peak
      print(f"  {row['shape']} dense: {row['ms']:.1f} ms", flush=True)
  except Exception as e:  # noqa: BLE001
    row["error"] = ctx.error(f"layer_bench/{row['shape']}/dense", e)
  return row


def section_layer_bench(ctx: Ctx, rec: dict) -> None:
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


# ----------------------------------------------------------------------------------------------
# 4. Training run of a ~100M-active-parameter MoE decoder


def train_model_config(t: dict):
  """ModelConfig built directly (no ml_collections): every block MoE, scanned, bf16 compute,
  tied embeddings (so 6*N_active counts the output projection once and the lookup not at all)."""
  from moe.model.config import ModelConfig
  from moe.layer.config import MoeConfig
  moe = MoeConfig(num_experts=t["E"], num_selected=t["K"], expert_hidden=t["F"],
                  capacity_factor=1.25, eval_capacity_factor=2.0, dispatch="auto")
  return ModelConfig(vocab_size=t["vocab"], d_model=t["d_model"], num_layers=t["layers"],
                     num_heads=t["heads"], num_kv_heads=t["heads"], head_dim=t["head_dim"],
                     d_ff=t["K"] * t["F"], max_len=t["seq"], moe=moe, dtype="bfloat16",
                     scan_layers=True, tie_embeddings=True)


def zipf_batch(key, cdf_V, batch: int, seq: int) -> dict:
  """A training batch of Zipf(1)-distributed token ids (id 0 the most frequent), made on device:
  learnable (the loss falls from ~ln V towards the distribution's entropy) without a dataset."""
  import jax
  import jax.numpy as jnp
  u_BL = jax.random.uniform(key, (batch, seq + 1))
  tokens = jnp.minimum(jnp.searchsorted(cdf_V, u_BL), cdf_V.shape[0] - 1).astype(jnp.int32)
  ones = jnp.ones((batch, seq), jnp.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
          "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
          "loss_mask": ones}


def build_train(t: dict, batch: int):
  """(jitted step(state, i) -> (state, scalar metrics), initial state, model config)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from moe.train import step as step_lib
  from moe.model.transformer import Transformer
  mc = train_model_config(t)
  model = Transformer(mc)
  tc = types.SimpleNamespace(learning_rate=t["lr"], warmup_steps=t["warmup"],
                             steps=t["steps"] + 1, min_lr_ratio=0.1, grad_clip=1.0, b1=0.9,
                             b2=0.95, weight_decay=0.1, trainable="all")
  init = jax.jit(lambda k: nn.meta.unbox(model.init({"params": k, "jitter": k, "dropout": k},
                                                    jnp.zeros((1, 16), jnp.int32))))
  variables = init(jax.random.PRNGKey(0))
  params = variables["params"]
  tx, frozen, schedule = step_lib.make_optimizer(tc, params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": jax.jit(tx.init)(params), "moe_bias": variables.get("moe_bias", {}),
           "rng": jax.random.PRNGKey(1)}
  train_step = step_lib.make_train_step(model, tx, frozen, schedule)
  ranks = jnp.arange(1, t["vocab"] + 1, dtype=jnp.float32)
  cdf_V = jnp.cumsum(1.0 / ranks) / jnp.sum(1.0 / ranks)
  data_key = jax.random.PRNGKey(2)

  def step(state, i):
    state, m = train_step(state, zipf_batch(jax.random.fold_in(data_key, i), cdf_V, batch,
                                            t["seq"]))
    dropped = [v for k, v in m.items() if k.endswith("/dropped_fraction")]
    return state, {"loss": m["loss"], "cross_entropy": m["cross_entropy"],
                   "grad_norm": m["grad_norm"],
                   "dropped_fraction": sum(dropped) / max(len(dropped), 1)}

  return jax.jit(step, donate_argnums=(0,)), state, mc


def train_counts(t: dict, mc) -> dict:
  from moe.model.transformer import active_params, count_params, param_shapes
  n_active = active_params(mc)
  attn = 12 * t["layers"] * t["d_model"] * t["seq"]
  return {"n_active": n_active, "n_total": count_params(param_shapes(mc)),
          "flops_per_token": 6 * n_active + attn,
          "flops_formula": "6*N_active + 12*layers*d_model*seq (N_active from "
                           "moe.model.transformer.active_params; attention scores and values, "
                           "fwd+bwd)"}


def compile_train(rec, t, batch):
  """(compiled step, state) for `batch` rows, or None when the compiled program won't fit."""
  import numpy as np
  t0 = time.perf_counter()
  jstep, state, mc = build_train(t, batch)
  rec["init_s"] = round(time.perf_counter() - t0, 2)
  rec.update(train_counts(t, mc))
  compiled, rec["compile_s"], mem = compile_timed(jstep, state, np.int32(0))
  rec["compile_s"] = round(rec["compile_s"], 2)
  limit = device_bytes_limit()
  if mem:
    rec["compiled_gb"] = round(needed_bytes(mem) / 1e9, 2)
    if limit and needed_bytes(mem) > 0.9 * limit:
      return None
  return compiled, state


def train_loop(ctx, compiled, state, steps: int):
  """Step 0 (timed alone), then steps 1..steps timed together; syncs every 10 steps to check
  the time box. Returns (per-step metrics as floats, timed steps, timed seconds, step-0 s)."""
  import jax
  import numpy as np
  t0 = time.perf_counter()
  state, m = compiled(state, np.int32(0))
  hist = [block(m)]
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  done = 0
  for i in range(1, steps + 1):
    state, m = compiled(state, np.int32(i))
    hist.append(m)
    done = i
    if i % 10 == 0:
      block(m)
      if ctx.left("train") < 3:
        break
  block(state)
  seconds = time.perf_counter() - t0
  hist = [{k: float(v) for k, v in jax.device_get(h).items()} for h in hist]
  return hist, done, seconds, first_s


def section_train(ctx: Ctx, rec: dict) -> None:
  """~100M-active MoE decoder, AdamW, on-device random Zipf tokens; throughput, MFU, loss."""
  t = ctx.cfg["train"]
  rec["config"] = dict(t, dispatch="auto", capacity_factor=1.25, dtype="bfloat16",
                       scan_layers=True, tie_embeddings=True, data="Zipf(1) random tokens")
  batch = t["batch"]
  while True:
    result = train_at(ctx, rec, t, batch)
    if result is not None:
      break
    batch //= 2  # the compiled step did not fit, or ran out of memory: half the batch
    if batch < max(1, t["batch"] // 4) or ctx.left("train") < TRAIN_MIN_S / 2:
      raise RuntimeError(f"no batch down to {batch * 2} rows fits (or the time box is spent)")
  train_summary(ctx, rec, *result)


def is_oom(e: BaseException) -> bool:
  msg = str(e)
  return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def train_at(ctx, rec, t, batch):
  """Compiles and runs the training at `batch` rows: train_loop's result, or None when the
  program does not fit the device (by XLA's memory analysis, or an out-of-memory error)."""
  try:
    built = compile_train(rec, t, batch)
    rec["batch"], rec["tokens_per_step"] = batch, batch * t["seq"]
    if built is None:
      ctx.error(f"train/batch {batch}", MemoryError(f"compiled step needs "
                                                    f"{rec.get('compiled_gb')} GB"))
      return None
    print(f"  batch {batch} x {t['seq']}, N_active {rec['n_active'] / 1e6:.1f}M, total "
          f"{rec['n_total'] / 1e6:.1f}M, compile {rec['compile_s']:.1f} s", flush=True)
    return train_loop(ctx, *built, t["steps"])
  except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
    if not is_oom(e):
      raise
    ctx.error(f"train/batch {batch}", e)
    return None


def train_summary(ctx, rec, hist, done, seconds, first_s) -> None:
  import jax
  rec.update(first_step_s=round(first_s, 3), timed_steps=done, timed_s=round(seconds, 3))
  rec["step_ms"] = 1e3 * seconds / max(done, 1)
  rec["tokens_per_s"] = rec["tokens_per_step"] * done / seconds if done else None
  if rec["tokens_per_s"]:
    rec["tflops"] = rec["flops_per_token"] * rec["tokens_per_s"] / 1e12
    peak = measured_peak(ctx)
    rec["mfu_measured_peak"] = rec["tflops"] / peak if peak else None
    rec["mfu_datasheet"] = rec["tflops"] / DATASHEET_BF16_TFLOPS
  rec["loss_first"], rec["loss_last"], rec["last_step"] = hist[0]["loss"], hist[-1]["loss"], done
  rec["ce_first"], rec["ce_last"] = hist[0]["cross_entropy"], hist[-1]["cross_entropy"]
  rec["loss_every_10"] = [round(h["loss"], 4) for h in hist[::10]]
  rec["dropped_fraction_last"] = hist[-1]["dropped_fraction"]
  losses = [h["loss"] for h in hist]
  rec["loss_finite_and_falling"] = bool(all(math.isfinite(v) for v in losses)
                                        and losses[-1] < losses[0])
  try:
    stats = jax.devices()[0].memory_stats() or {}
    rec["peak_gb_in_use"] = round(stats.get("peak_bytes_in_use", 0) / 1e9, 2) or None
  except Exception:  # noqa: BLE001
    pass
  print(f"  {rec['tokens_per_s'] or 0:.0f} tokens/s, {rec.get('tflops', 0):.1f} TFLOP/s, loss "
        f"{rec['loss_first']:.3f} -> {rec['loss_last']:.3f} (step {done})", flush=True)


# ----------------------------------------------------------------------------------------------
# Rendering (from the results dict alone, so --from-json needs no measurement)


def fmt_row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _f(v, spec=".1f", none="-"):
  return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_head(r: dict) -> list[str]:
  m, secs = r.get("meta", {}), r.get("sections", {})
  limit = secs.get("device", {}).get("device", {}).get("bytes_limit")
  pk = "; ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
  out = [SECTION, ""]
  if m.get("smoke"):
    out += ["**Smoke run** (`--smoke`: tiny shapes, not a measurement).", ""]
  out.append(f"Measured {m.get('date', '?')} on {m.get('device_count', '?')} x "
             f"{m.get('device_kind', '?')} (backend {m.get('backend', '?')}"
             + (f", {limit / 2 ** 30:.0f} GiB usable by XLA at "
                f"XLA_PYTHON_CLIENT_MEM_FRACTION={m.get('mem_fraction') or 'default'}"
                if limit else "")
             + f"), host {m.get('host', '?')}; {m.get('versions', '?')}"
             + (f"; {pk}" if pk else "") + ".")
  out.append(f"Command: `{m.get('command', '?')}`. Load average before/after: "
             f"{m.get('load_before', '?')} / {m.get('load_after', '?')}. Total "
             f"{_f(m.get('wall_s'), '.0f')} s (time box {_f(m.get('budget_s'), '.0f')} s)"
             + ("; stopped by the watchdog" if m.get("watchdog_exit") else "")
             + f". XLA_FLAGS: `{m.get('xla_flags') or '(none)'}`.")
  if m.get("nvidia_smi_before") and not m["nvidia_smi_before"].startswith("unavailable"):
    out.append(f"nvidia-smi (name, driver, memory, SM clock, max SM clock, power limit, "
               f"temperature) before: `{m['nvidia_smi_before']}`; after: "
               f"`{m.get('nvidia_smi_after', '?')}`.")
  status = ", ".join(f"{n} {secs.get(n, {}).get('status', 'not run')} "
                     f"({_f(secs.get(n, {}).get('seconds'), '.0f')} s)" for n in SECTIONS)
  out += ["", f"Sections: {status}."]
  if m.get("forbidden_modules_loaded"):
    out.append(f"Modules that should not load but did: {m['forbidden_modules_loaded']}.")
  return out


def render_device(d: dict) -> list[str]:
  out = ["", "### 1. Device peak and bandwidth", ""]
  if not d.get("matmul"):
    return out + [f"Not measured ({d.get('status', 'not run')})."]
  n = d.get("matmul_n")
  out += [fmt_row([f"jnp.dot {n}x{n}x{n}", "TFLOP/s", "ms per call"]), fmt_row(["---"] * 3)]
  for name, v in d["matmul"].items():
    note = v.get("skipped") or v.get("error")
    out.append(fmt_row([name, note or _f(v.get("tflops")), "" if note else _f(v.get("ms"), ".3f")]))
  p = d.get("peak_bf16_tflops")
  f32 = [d["matmul"].get(k, {}).get("tflops") for k in ("f32, default precision",
                                                         "f32, precision=highest")]
  if all(f32):
    out += ["", f"f32 at default precision runs {f32[0] / f32[1]:.1f}x the speed of "
            "precision=highest (well above 1: XLA uses TF32 or bf16 passes for f32 matmuls by "
            "default, hence 'highest' in the float32 correctness check)."]
  out += ["", f"Measured bf16 peak (the better bf16 row, used below): {_f(p)} TFLOP/s"
          + (f" = {100 * p / DATASHEET_BF16_TFLOPS:.0f}% of the datasheet "
             f"{DATASHEET_BF16_TFLOPS:.0f} TFLOP/s dense bf16" if p else "")
          + ". Median of rounds of back-to-back calls after warm-up (2 n^3 FLOPs per call)."]
  bw = d.get("bandwidth", {})
  if "elementwise_gbps" in bw:
    out.append(f"Bandwidth: y = 2*x on {bw['elementwise_mib']} MiB f32: "
               f"{bw['elementwise_gbps']:.0f} GB/s (bytes read + written); host->device "
               f"{bw['h2d_gbps']:.1f} GB/s, device->host {bw['d2h_gbps']:.1f} GB/s "
               f"({bw['host_mib']} MiB).")
  return out


def render_correctness(c: dict) -> list[str]:
  out = ["", "### 2. Dispatch strategies vs 'reference' (output and gradients)", ""]
  if not c.get("rows"):
    return out + [f"Not run ({c.get('status', 'not run')})."]
  s = c["shape"]
  out.append(f"G={s['G']} groups x T={s['T']} tokens ({s['tokens']}), D={s['D']}, F={s['F']}, "
             f"E={s['E']}, K={s['K']}, SwiGLU, 5% padding tokens. {c['method']}. Relative error "
             f"||a - b|| / ||b||; pass: every entry <= {c['tolerance']['float32']:g} (float32) "
             f"or {c['tolerance']['bfloat16']:g} (bfloat16). {c.get('passed', 0)} of "
             f"{c.get('checked', 0)} checked rows pass.")
  out += ["", fmt_row(["strategy", "dtype", "routing", "out", "d x", "d w_in", "d w_gate",
                       "d w_out", "d combine", "result", "max vs f32 reference"]),
          fmt_row(["---"] * 11)]
  for row in c["rows"]:
    routing = row["routing"] + (f" (C={row['capacity']}, {100 * row['dropped_fraction']:.1f}% "
                                "dropped)" if row.get("capacity") else "")
    if "errors" not in row:
      note = row.get("skipped") or row.get("error", "?")
      out.append(fmt_row([row["strategy"], row["dtype"], routing] + ["-"] * 6 + [note, "-"]))
      continue
    e = row["errors"]
    errs = [_f(e.get(k), ".1e") for k in ("out", "grad_x", "grad_w_in", "grad_w_gate",
                                          "grad_w_out", "grad_combine_weights")]
    out.append(fmt_row([row["strategy"], row["dtype"], routing] + errs
                       + ["pass" if row.get("pass") else "**FAIL**",
                          _f(row.get("max_error_vs_f32_reference"), ".1e")]))
  floor = c.get("noise_floor_bf16_vs_f32", {})
  if floor:
    out += ["", "For scale, bfloat16 'reference' vs float32 'reference' (max over output and "
            "gradients): " + ", ".join(f"{k} {max(v.values()):.1e}" for k, v in floor.items())
            + "; the last column compares each bfloat16 row with the float32 reference the "
            "same way."]
  return out


def render_layer_bench(b: dict) -> list[str]:
  out = ["", "### 3. MoE layer forward+backward, bfloat16", ""]
  if not b.get("rows"):
    return out + [f"Not run ({b.get('status', 'not run')})."]
  out.append(f"{b['method']}. Dense = SwiGLU FFN of width K*F with the same FLOPs. TFLOP/s counts "
             f"{b['flops_formula']}; % of the measured bf16 peak ({_f(b['peak_used_tflops'])} "
             f"TFLOP/s). Entries estimated above {b['mem_limit_gb']:.0f} GB or 2 s per step are "
             "skipped; 'compiled GB' = XLA's temp + argument + output sizes (what the program "
             "needs on the device); 'XLA FLOPs / "
             "active' = the compiled program's own FLOP count over the active FLOPs (a while "
             "loop's body, as in 'grouped', is counted once; far above 1 means padding or a "
             "dense rewrite, e.g. of ragged_dot's weight gradient).")
  out += ["", fmt_row(["shape", "strategy", "routing", "fwd+bwd ms", "MoE / dense", "TFLOP/s",
                       "% of peak", "XLA FLOPs / active", "compile s", "compiled GB", "note"]),
          fmt_row(["---"] * 11)]
  for row in b["rows"]:
    routing = row["routing"] + (f" (C={row['capacity']})" if row.get("capacity") else "")
    hlo = row.get("hlo_mentions") if row["strategy"] == "ragged" else None
    hlo = hlo and "HLO mentions " + ", ".join(f"{k} x{v}" for k, v in hlo.items())
    note = "; ".join(x for x in (row.get("variant"), row.get("skipped"), row.get("error"), hlo)
                     if x)
    out.append(fmt_row([row["shape"], row["strategy"], routing, _f(row.get("ms")),
                        _f(row.get("ratio"), ".2f"), _f(row.get("tflops")),
                        _f(row.get("pct_peak"), ".0f"), _f(row.get("xla_flops_over_active"), ".2f"),
                        _f(row.get("compile_s")),
                        _f(row.get("compiled_gb")), note]))
  gpu = b.get("auto_table", {}).get("gpu")
  out += ["", "`moe.layer.dispatch.AUTO` (what `auto` picks; read from the code)"
          + (f": on GPU {gpu[0]} with a capacity, {gpu[1]} dropless." if gpu else ".")]
  for shape, auto in b.get("auto", {}).items():
    best = b.get("fastest", {}).get(shape, {})
    out.append(f"- {shape}: `auto` resolves to {auto['cf 1.25']} (cf 1.25) / {auto['dropless']} "
               f"(dropless) on this backend; fastest plain strategy measured, i.e. what `auto` "
               f"should pick: {best.get('cf 1.25', '-')} (cf 1.25) / "
               f"{best.get('dropless', '-')} (dropless).")
  return out


def render_train(t: dict) -> list[str]:
  out = ["", "### 4. Training run", ""]
  c = t.get("config")
  if not c:
    return out + [f"Not run ({t.get('status', 'not run')})."]
  out.append(f"Decoder-only `moe.model.transformer.Transformer`: D={c['d_model']}, "
             f"{c['layers']} blocks (scanned), {c['heads']} heads of {c['head_dim']}, every block "
             f"MoE with E={c['E']}, K={c['K']}, F={c['F']} (SwiGLU), dispatch auto, capacity "
             f"factor 1.25, vocab {c['vocab']} (tied embeddings), bf16 compute, f32 params; "
             f"AdamW (moe.train.step, lr {c['lr']}, warmup {c['warmup']}, cosine, clip 1.0); "
             f"{c['data']} made on device. Status: {t.get('status', '?')}.")
  if "n_active" not in t:
    return out
  out += ["", fmt_row(["metric", "value"]), fmt_row(["---"] * 2)]
  out += [fmt_row([k, v]) for k, v in train_rows(t, c)]
  return out


def _pct(v):
  return "-" if not v else f"{100 * v:.1f} %"


def train_rows(t: dict, c: dict) -> list[tuple[str, str]]:
  return [
      ("parameters (active / total)", f"{t['n_active'] / 1e6:.1f}M / {t['n_total'] / 1e6:.1f}M"),
      ("batch", f"{t.get('batch')} x {c['seq']} = {t.get('tokens_per_step')} tokens"),
      ("compile s (init s)", f"{_f(t.get('compile_s'))} ({_f(t.get('init_s'))})"),
      ("compiled GB / peak GB in use",
       f"{_f(t.get('compiled_gb'))} / {_f(t.get('peak_gb_in_use'))}"),
      ("first step s (excluded)", _f(t.get("first_step_s"), ".2f")),
      ("timed steps, ms per step", f"{t.get('timed_steps', '-')}, {_f(t.get('step_ms'))}"),
      ("tokens/s", _f(t.get("tokens_per_s"), ".0f")),
      ("model FLOPs per token", f"{t['flops_per_token'] / 1e6:.0f}M = {t['flops_formula']}"),
      ("TFLOP/s", _f(t.get("tflops"))),
      ("MFU vs measured bf16 peak", _pct(t.get("mfu_measured_peak"))),
      (f"MFU vs datasheet {DATASHEET_BF16_TFLOPS:.0f}", _pct(t.get("mfu_datasheet"))),
      ("loss at step 0 -> last step",
       f"{_f(t.get('loss_first'), '.3f')} -> {_f(t.get('loss_last'), '.3f')} (step "
       f"{t.get('last_step', '-')}; cross-entropy {_f(t.get('ce_first'), '.3f')} -> "
       f"{_f(t.get('ce_last'), '.3f')})"),
      ("loss every 10 steps", ", ".join(f"{v:.2f}" for v in t.get("loss_every_10", []))),
      ("finite and falling", str(t.get("loss_finite_and_falling"))),
      ("dropped fraction (last step, mean over layers)",
       _f(t.get("dropped_fraction_last"), ".3f"))]


def render(r: dict) -> str:
  secs = r.get("sections", {})
  out = render_head(r)
  out += render_device(secs.get("device", {}))
  out += render_correctness(secs.get("correctness", {}))
  out += render_layer_bench(secs.get("layer_bench", {}))
  out += render_train(secs.get("train", {}))
  errors = r.get("errors", [])
  if errors:
    out += ["", "Errors (one line each; tracebacks in the JSON):", ""]
    out += [f"- {e['where']}: `{e['error']}`" for e in errors]
  return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# Summary and main


def headline(name: str, s: dict) -> str:
  if name == "device" and s.get("peak_bf16_tflops"):
    bw = s.get("bandwidth", {}).get("elementwise_gbps")
    return (f"bf16 peak {s['peak_bf16_tflops']:.1f} TFLOP/s "
            f"({100 * s['peak_bf16_tflops'] / DATASHEET_BF16_TFLOPS:.0f}% of 989), "
            f"elementwise {_f(bw, '.0f')} GB/s")
  if name == "correctness" and s.get("rows"):
    worst = {d: max((r["max_error"] for r in s["rows"] if r["dtype"] == d and "max_error" in r),
                    default=None) for d in TOLERANCE}
    return (f"{s.get('passed', 0)}/{s.get('checked', 0)} pass; max rel err f32 "
            f"{_f(worst['float32'], '.1e')}, bf16 {_f(worst['bfloat16'], '.1e')}")
  if name == "layer_bench" and s.get("rows"):
    parts = []
    for shape, best in s.get("fastest", {}).items():
      auto = s.get("auto", {}).get(shape, {})
      parts.append(f"E={shape.split('E=')[1]}: fastest "
                   f"{best.get('cf 1.25', '-')}/{best.get('dropless', '-')}, auto "
                   f"{auto.get('cf 1.25', '-')}/{auto.get('dropless', '-')}")
    return "; ".join(parts)
  if name == "train" and s.get("tokens_per_s"):
    return (f"{s['tokens_per_s']:.0f} tok/s, {s.get('tflops', 0):.1f} TFLOP/s, MFU "
            f"{_pct(s.get('mfu_measured_peak'))} of measured / {_pct(s.get('mfu_datasheet'))} "
            f"of datasheet peak, loss {s['loss_first']:.2f} -> {s['loss_last']:.2f}")
  return ""


def print_summary(r: dict) -> None:
  print("\nsummary:")
  print(fmt_row(["section", "status", "s", "headline"]))
  for name in SECTIONS:
    s = r.get("sections", {}).get(name, {})
    print(fmt_row([name, s.get("status", "not run")[:60], _f(s.get("seconds"), ".0f"),
                   headline(name, s)]))
  print(f"total {_f(r.get('meta', {}).get('wall_s'), '.0f')} s; errors: "
        f"{len(r.get('errors', []))}", flush=True)


def check_imports(ctx: Ctx) -> None:
  """Imports the moe modules the sections use; records failures and forbidden packages."""
  meta = ctx.results["meta"]
  meta["moe_imports"] = {}
  for name in ("moe.layer.config", "moe.model.config", "moe.layer.routing", "moe.layer.dispatch",
               "moe.layer.modules", "moe.model.transformer", "moe.train.step"):
    try:
      __import__(name)
      meta["moe_imports"][name] = "ok"
    except Exception as e:  # noqa: BLE001
      meta["moe_imports"][name] = ctx.error(f"import {name}", e)
  meta["forbidden_modules_loaded"] = sorted(m for m in FORBIDDEN if m in sys.modules)


def all_ok(r: dict) -> bool:
  secs = r.get("sections", {})
  corr = secs.get("correctness", {}).get("rows", [])
  return (all(secs.get(n, {}).get("status") == "ok" for n in SECTIONS)
          and all(row.get("pass") is not False for row in corr)
          and secs.get("train", {}).get("loss_finite_and_falling") is True)


def main(argv=None) -> int:
  """Exit code 0 when every section ran, every correctness row passed and the loss fell;
  1 otherwise (the results are written either way); 3 when the watchdog stopped the run."""
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      results = json.load(f)
    text = render(results)
    print(text)
    if args.output:
      write_section(args.output, SECTION, text)
      print(f"wrote section {SECTION!r} of {args.output}")
    return 0
  ctx = Ctx(args, SMOKE if args.smoke else FULL)
  start_watchdog(ctx)
  for step in (collect_meta, check_imports):
    try:
      step(ctx)
    except Exception as e:  # noqa: BLE001
      ctx.error(step.__name__, e)
  for name, fn in (("device", section_device), ("correctness", section_correctness),
                   ("layer_bench", section_layer_bench), ("train", section_train)):
    run_section(ctx, name, fn)
  ctx.results["meta"].update(load_after=loadavg(), nvidia_smi_after=nvidia_smi(),
                             forbidden_modules_loaded=sorted(m for m in FORBIDDEN
                                                             if m in sys.modules))
  ctx.save()
  print_summary(ctx.results)
  print(f"wrote {os.path.join(args.out, JSON_NAME)} and {os.path.join(args.out, MD_NAME)}")
  if args.output:
    write_section(args.output, SECTION, render(ctx.results))
    print(f"wrote section {SECTION!r} of {args.output}")
  return 0 if all_ok(ctx.results) else 1


if __name__ == "__main__":
  sys.exit(main())
