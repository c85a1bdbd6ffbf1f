"""Section 4 of experiments/accelerator_check.py: a short training run of a ~100M-active MoE
decoder (throughput, MFU, loss)."""

from __future__ import annotations

import math
import time
import types

from accel_common import (DATASHEET_BF16_TFLOPS, TRAIN_MIN_S, block, compile_timed,
                          device_bytes_limit, measured_peak, needed_bytes)


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


def section_train(ctx, rec: dict) -> None:
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
