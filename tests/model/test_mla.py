"""Multi-head latent attention: a numpy reference on odd sizes, the latent KV cache, the configs
it refuses."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import one_line_error
from moe.model.attention import rope_inv_freq
from moe.model.config import validate_model
from moe.model.mla import LatentAttention
from moe.model.transformer import Transformer, init_cache
from tiny_models import B, L, decode_step_by_step, dropless_moe, fwd, init, tiny, tokens


def mla(**kw):
  base = dict(attention="mla", num_heads=3, num_kv_heads=1, q_lora_rank=5, kv_lora_rank=7, qk_nope_head_dim=3,
              qk_rope_head_dim=6, v_head_dim=5)
  base.update(kw)
  return tiny(**base)


def rope_pairs(x_LK, pos_L, theta, interleaved):
  """Rotary embedding by definition: feature pairs (i, i + K/2), or (2i, 2i + 1) interleaved
  (DeepSeek-V2's complex rotation, output left in place)."""
  k = x_LK.shape[-1]
  inv = np.asarray(rope_inv_freq(k, theta), np.float64)
  out = np.empty_like(x_LK)
  for i, p in enumerate(pos_L):
    c, s = np.cos(p * inv), np.sin(p * inv)
    a, b = (x_LK[i, 0::2], x_LK[i, 1::2]) if interleaved else (x_LK[i, :k // 2], x_LK[i, k // 2:])
    ra, rb = a * c - b * s, b * c + a * s
    if interleaved:
      out[i, 0::2], out[i, 1::2] = ra, rb
    else:
      out[i, :k // 2], out[i, k // 2:] = ra, rb
  return out


def rms(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def mla_ref(cfg, p, x_BLD, pos_BL, seg_BL):
  """Plain loops, straight from the equations in moe/model/mla.py's docstring."""
  x = np.asarray(x_BLD, np.float64)
  g = lambda n: np.asarray(p[n], np.float64)  # noqa: E731
  bias = lambda n: g(n) if cfg.attention_bias else 0.0  # noqa: E731
  Dn, Dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  if cfg.q_lora_rank is None:
    q = np.einsum("bld,dhk->blhk", x, g("q_kernel"))
  else:
    cq = rms(x @ g("q_a_kernel") + bias("q_a_bias"), g("q_a_norm_scale"))
    q = np.einsum("blr,rhk->blhk", cq, g("q_b_kernel"))
  c = rms(x @ g("kv_a_kernel") + bias("kv_a_bias"), g("kv_a_norm_scale"))
  kr = x @ g("k_rope_kernel") + bias("k_rope_bias")
  kn = np.einsum("blr,rhk->blhk", c, g("k_b_kernel"))
  v = np.einsum("blr,rhk->blhk", c, g("v_b_kernel"))
  b_, l_, h_, _ = q.shape
  out = np.zeros((b_, l_, h_, cfg.v_head_dim))
  for b in range(b_):
    krb = rope_pairs(kr[b], pos_BL[b], cfg.rope_theta, cfg.rope_interleave)
    for h in range(h_):
      qr = rope_pairs(q[b, :, h, Dn:], pos_BL[b], cfg.rope_theta, cfg.rope_interleave)
      for i in range(l_):
        vis = [j for j in range(l_) if j <= i and seg_BL[b, i] == seg_BL[b, j] != 0
               and (cfg.sliding_window is None or i - j < cfg.sliding_window)]
        if not vis:
          continue
        s = np.array([q[b, i, h, :Dn] @ kn[b, j, h] + qr[i] @ krb[j] for j in vis])
        s /= math.sqrt(Dn + Dr)
        w = np.exp(s - s.max())
        w /= w.sum()
        out[b, i, h] = sum(wj * v[b, j, h] for wj, j in zip(w, vis))
  return np.einsum("blhk,hkd->bld", out, g("o_kernel")) + bias("o_bias")


@pytest.mark.parametrize("kw", [
    dict(),
    dict(q_lora_rank=None, rope_interleave=True, attention_bias=True),
    dict(sliding_window=3, rope_theta=100.0, rope_interleave=True),
])
def test_mla_matches_reference(kw):
  cfg = mla(**kw)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(B, L, cfg.d_model)), jnp.float32)
  seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [3] * L])
  pos = np.array([list(range(4)) + list(range(5)) + [0, 0], list(range(L))])
  attn = LatentAttention(cfg)
  p = nn.unbox(jax.jit(attn.init)(jax.random.key(1), x, jnp.asarray(pos), jnp.asarray(seg))["params"])
  # Every parameter away from its init (norm scales 1, biases 0) so each one matters.
  p = {n: a + 0.2 * jnp.asarray(rng.normal(size=a.shape), jnp.float32) for n, a in p.items()}
  y = np.asarray(jax.jit(attn.apply)({"params": p}, x, jnp.asarray(pos), jnp.asarray(seg)))
  ref = mla_ref(cfg, p, x, pos, seg)
  np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)
  pad_out = np.asarray(p["o_bias"]) if cfg.attention_bias else 0.0
  np.testing.assert_allclose(y[0, 9:], np.broadcast_to(pad_out, (2, cfg.d_model)), atol=1e-6)


def test_mla_params_and_logical_axes():
  cfg = mla()
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens()))["params"]
  attn = boxed["block_0"]["attn"]
  shapes = {n: tuple(a.value.shape) for n, a in attn.items()}
  assert shapes == {"q_a_kernel": (16, 5), "q_a_norm_scale": (5,), "q_b_kernel": (5, 3, 9),
                    "kv_a_kernel": (16, 7), "kv_a_norm_scale": (7,), "k_rope_kernel": (16, 6),
                    "k_b_kernel": (7, 3, 3), "v_b_kernel": (7, 3, 5), "o_kernel": (3, 5, 16)}
  for n, a in attn.items():
    assert isinstance(a, nn.LogicallyPartitioned) and len(a.names) == len(a.value.shape), n
  assert attn["kv_a_kernel"].names == ("embed", "latent")


def decode_configs():
  return [pytest.param(mla(), id="lora"),
          pytest.param(mla(q_lora_rank=None, rope_interleave=True, sliding_window=4,
                           moe=dropless_moe(), first_moe_layer=1), id="interleave_moe"),
          pytest.param(mla(scan_layers=True, attention_bias=True), id="scan")]


@pytest.mark.parametrize("cfg", decode_configs())
def test_mla_cache_matches_full_forward(cfg):
  model = Transformer(cfg)
  v = init(cfg)
  toks = tokens(15)
  full = np.asarray(fwd(cfg, v, toks))
  cache = init_cache(model, B)
  layer = cache["blocks"]["attn"] if cfg.scan_layers else cache["block_0"]["attn"]
  lead = (cfg.num_layers,) if cfg.scan_layers else ()
  # The latent and the rotary key are cached, not per-head keys and values.
  assert {n: tuple(a.shape) for n, a in layer.items()} == {
      "cached_latent": lead + (B, cfg.max_len, 7), "cached_rope_key": lead + (B, cfg.max_len, 6),
      "cached_segment": lead + (B, cfg.max_len)}
  logits, cache = decode_step_by_step(cfg, v, toks, 4)
  np.testing.assert_allclose(logits, full, atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == L


def test_interleave_changes_the_function():
  """rope_interleave is not a no-op: the same weights give other logits."""
  cfg = mla()
  v = init(cfg)
  a = np.asarray(fwd(cfg, v, tokens()))
  b = np.asarray(fwd(dataclasses.replace(cfg, rope_interleave=True), v, tokens()))
  assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("kw,needles", [
    (dict(attention="mqa"), ("model.attention", "'mha'", "'mla'")),
    (dict(kv_lora_rank=0), ("model.kv_lora_rank",)),
    (dict(q_lora_rank=0), ("model.q_lora_rank",)),
    (dict(qk_rope_head_dim=5), ("model.qk_rope_head_dim", "even")),
    (dict(positions="learned"), ("model.positions", "'rope'")),
    (dict(rope_interleave=1), ("model.rope_interleave",)),
    (dict(qk_norm="head"), ("model.qk_norm", "'mha'")),
    (dict(qkv_bias=True), ("model.qkv_bias", "'mha'")),
])
def test_mla_config_errors(kw, needles):
  with one_line_error(*needles):
    validate_model(mla(**kw))


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=None, moe=dropless_moe())])
def test_mla_flops_are_twice_the_active_matmul_params(kw):
  """Projection FLOPs = 2 x the active parameters a token multiplies by (everything but the
  lookup and the norm scales); scores: QK^T over Dn + Dr features, AV over Dv."""
  from moe.model.flops import flops_per_token, mean_context
  from moe.model.transformer import active_params
  cfg = mla(**kw)
  c = flops_per_token(cfg, seq_len=6)
  norms = (2 * cfg.num_layers + 1) * cfg.d_model + cfg.num_layers * (cfg.kv_lora_rank
                                                                      + (cfg.q_lora_rank or 0))
  lookup = cfg.vocab_size * cfg.d_model
  assert c.forward - c.attention_scores == 2 * (active_params(cfg) - norms - lookup)
  assert c.attention_scores == cfg.num_layers * 2 * 3 * (3 + 6 + 5) * mean_context(6)
