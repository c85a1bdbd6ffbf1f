"""Peak matmul FLOP/s of one device, for MFU (model FLOPs utilization).

`device_peak(device, dtype) -> Peak | None`: the vendor's dense (no sparsity) matmul peak of a
TPU / GPU named by `device.device_kind`, for the model's compute dtype; on a CPU, a peak measured
once per machine by a short jitted float32 matmul benchmark and cached in
`~/.cache/moe/cpu_peak.json`, keyed by CPU model, core count and jax version (later runs read it;
delete the file to measure again, e.g. after measuring on a busy machine).
None for an accelerator missing from the table: MFU is then left out, TFLOP/s still reported.

`throughput(flops_per_step, steps_per_s, devices, peak)` -> the record fields
`tflops_per_device` and `mfu`.

float32 on a GPU means TF32 (XLA's default precision for float32 matmuls there; the project's
H200 check measured f32 at default precision at 7x precision='highest'); on a TPU, the default
float32 matmul is a bfloat16 pass, so the float32 row is the bfloat16 peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

# Dense matmul peaks in TFLOP/s per device (one chip; an A100/H100/H200 is one device) from the
# vendors' spec sheets:
#   TPU v4 275 bf16: cloud.google.com/tpu/docs/v4     TPU v5e 197: cloud.google.com/tpu/docs/v5e
#   TPU v5p 459 bf16: cloud.google.com/tpu/docs/v5p   TPU v6e 918: cloud.google.com/tpu/docs/v6e
#   A100 (SXM and PCIe) 312 bf16, 156 TF32: NVIDIA A100 Tensor Core GPU datasheet
#   H100 SXM 989 bf16, 495 TF32; H100 PCIe 756 / 378: NVIDIA H100 Tensor Core GPU datasheet
#   H200 (SXM) 989 bf16, 495 TF32: NVIDIA H200 Tensor Core GPU datasheet
# (The sheets print twice these numbers "with sparsity"; those are not used.) For reference,
# BENCHMARKS.md "Accelerator check" measured 789 TFLOP/s for a bf16 jnp.dot on one H200.
# Rows are matched in order against the lower-cased device_kind: the first hit wins.
PEAK_TFLOPS = (
    # (substrings that must all occur, name, bfloat16, float32)
    (("v6",), "TPU v6e", 918.0, 918.0),
    (("v5", "lite"), "TPU v5e", 197.0, 197.0),
    (("v5e",), "TPU v5e", 197.0, 197.0),
    (("v5",), "TPU v5p", 459.0, 459.0),
    (("v4",), "TPU v4", 275.0, 275.0),
    (("h200",), "H200", 989.0, 495.0),
    (("h100", "pcie"), "H100 PCIe", 756.0, 378.0),
    (("h100",), "H100 SXM", 989.0, 495.0),
    (("a100",), "A100", 312.0, 156.0),
)
CPU_CACHE = os.path.join("~", ".cache", "moe", "cpu_peak.json")
CPU_BENCH_N = 1024  # the benchmark's square matmul size


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_s: float  # one device
  source: str  # e.g. "H200 bfloat16 (spec sheet)" or "cpu float32 matmul (measured)"


def table_peak(device_kind: str, dtype: str) -> Peak | None:
  """The spec-sheet peak of an accelerator named `device_kind`, or None if it is not listed."""
  kind = device_kind.lower()
  for needles, name, bf16, f32 in PEAK_TFLOPS:
    if all(n in kind for n in needles):
      tflops = bf16 if dtype == "bfloat16" else f32
      return Peak(tflops * 1e12, f"{name} {dtype} (spec sheet)")
  return None


def cpu_key() -> str:
  """What the measured CPU peak depends on: CPU model, the cores this process may use
  (`moe.train.machine.host_cpus`: a `taskset` or cgroup limit measures a lower peak), jax
  version."""
  import jax
  from moe.train import machine
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  return f"{model} | {machine.host_cpus()} cores | jax {jax.__version__}"


def measure_cpu_peak(n: int = CPU_BENCH_N, rounds: int = 5) -> float:
  """FLOP/s of the best of `rounds` jitted float32 [n, n] x [n, n] matmuls on the CPU."""
  import jax
  import jax.numpy as jnp
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()  # compile
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def cpu_peak(cache_file: str = CPU_CACHE) -> Peak:
  """The CPU's measured float32 matmul peak, from the cache file or measured and cached."""
  path = os.path.expanduser(cache_file)
  key = cpu_key()
  cache = {}
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    pass
  if not isinstance(cache, dict) or not isinstance(cache.get(key), (int, float)):
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = measure_cpu_peak()
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(cache, f, indent=1)
      os.replace(tmp, path)
    except OSError:
      pass  # a read-only home: measured again next time
  return Peak(float(cache[key]), "cpu float32 matmul (measured)")


def device_peak(device, dtype: str, cache_file: str = CPU_CACHE) -> Peak | None:
  """The peak of one `device` (a jax Device) for compute `dtype` ("float32" | "bfloat16")."""
  if device.platform == "cpu":  # the benchmark used every core; CPU devices share them
    import jax
    whole, n = cpu_peak(cache_file), jax.local_device_count("cpu")
    return whole if n == 1 else Peak(whole.flops_per_s / n, f"{whole.source} / {n} devices")
  return table_peak(device.device_kind, dtype)


def throughput(flops_per_step: float, steps_per_s: float, devices: int,
               peak: Peak | None) -> dict:
  """{"tflops_per_device", "mfu"} (mfu only with a known peak) of a measured step rate."""
  per_device = flops_per_step * steps_per_s / max(devices, 1)
  out = {"tflops_per_device": per_device / 1e12}
  if peak is not None and peak.flops_per_s > 0:
    out["mfu"] = per_device / peak.flops_per_s
  return out
