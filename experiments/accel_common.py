"""Shared pieces of experiments/accelerator_check.py: constants, error lines, timing helpers.

Imports no JAX at import time (each helper imports it when called), so --from-json rendering and
the driver's start-up stay free of it. A `ctx` argument here and in the section modules
(accel_device, accel_layer, accel_train) is accelerator_check.Ctx: the run's configuration
(`ctx.cfg`, `ctx.args`), results, clock (`ctx.left(section)`), `ctx.error` and `ctx.save`.
"""

from __future__ import annotations

import statistics
import time

SECTION = "## Accelerator check"
DATASHEET_BF16_TFLOPS = 989.0  # H200 SXM, dense bf16 tensor core (no sparsity)
SECTIONS = ("device", "correctness", "layer_bench", "train")
TRAIN_MIN_S = 60.0  # section 4 is skipped with less of the budget left than this
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # section 2: max relative error that passes


def one_line(e: BaseException) -> str:
  """'Type: first non-empty line of the message' (at most 300 characters)."""
  lines = [s.strip() for s in str(e).splitlines() if s.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


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


def measured_peak(ctx) -> float | None:
  """The measured bf16 matmul peak (TFLOP/s) of section 1, or None."""
  return ctx.results["sections"].get("device", {}).get("peak_bf16_tflops")
