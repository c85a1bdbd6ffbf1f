"""Section 1 of experiments/accelerator_check.py: device facts, matmul peak and bandwidth."""

from __future__ import annotations

import time

from accel_common import DATASHEET_BF16_TFLOPS, block, device_bytes_limit, time_calls


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


def section_device(ctx, rec: dict) -> None:
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
