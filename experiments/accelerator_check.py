"""One-shot accelerator check: peak, correctness, MoE layer speed and a ~100M-active training run.

Prepared to run ONCE on a lent GPU (one H200) within a tight device budget; every section is
time-boxed and wrapped in try/except, so one failure is recorded (one line) and the next
section still runs:

    python experiments/accelerator_check.py --out "$OUT"                  # on the GPU, < 7 min
    python experiments/accelerator_check.py --smoke --out /tmp/accel      # tiny shapes, CPU, ~1 min
    python experiments/accelerator_check.py --from-json accel_out/accelerator_check.json \\
        --output BENCHMARKS.md                                            # re-render, no JAX work

Sections, in order (see each function's docstring for the exact method; section 1 lives in
accel_device.py, sections 2 and 3 in accel_layer.py, section 4 in accel_train.py):

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

This file is the driver: command line, run configurations, the results/clock context with its
time box, incremental saving and watchdog, run metadata and the exit code. accel_common.py holds
the shared constants and timing helpers, accel_render.py the markdown and console summary (from
the results dict alone, so --from-json imports no JAX).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
import traceback

from accel_common import SECTION, SECTIONS, TRAIN_MIN_S, one_line
from accel_device import section_device
from accel_layer import section_correctness, section_layer_bench
from accel_render import print_summary, render
from accel_train import section_train
from bench_common import ROOT, command_line, loadavg, machine, versions, write_section

T_START = time.perf_counter()

sys.path.insert(0, ROOT)

JSON_NAME, MD_NAME = "accelerator_check.json", "accelerator_check.md"
FORBIDDEN = ("ml_collections", "clu", "grain", "tensorflow", "tensorflow_datasets",
             "sentencepiece")
# End of each section's share of --budget-s (fraction); section 4 needs at least TRAIN_MIN_S.
DEADLINES = {"device": 0.08, "correctness": 0.30, "layer_bench": 0.72, "train": 1.0}

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


def forbidden_loaded() -> list[str]:
  return sorted(m for m in FORBIDDEN if m in sys.modules)


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
  meta["forbidden_modules_loaded"] = forbidden_loaded()


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
                             forbidden_modules_loaded=forbidden_loaded())
  ctx.save()
  print_summary(ctx.results)
  print(f"wrote {os.path.join(args.out, JSON_NAME)} and {os.path.join(args.out, MD_NAME)}")
  if args.output:
    write_section(args.output, SECTION, render(ctx.results))
    print(f"wrote section {SECTION!r} of {args.output}")
  return 0 if all_ok(ctx.results) else 1


if __name__ == "__main__":
  sys.exit(main())
