"""Attention against a brute-force reference (biases, QK-norm), sliding window, grouped-query
heads, KV cache."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model.attention import Attention, rope_inv_freq
from moe.model.transformer import Transformer, init_cache
from tiny_models import (B, L, V, decode_step_by_step, dropless_moe, fwd, init, run, tiny,
                         tokens)


def rope_ref(x_LK, pos_L, theta):
  half = x_LK.shape[-1] // 2
  inv = np.asarray(rope_inv_freq(x_LK.shape[-1], theta), np.float64)
  out = np.empty_like(x_LK)
  for i, p in enumerate(pos_L):
    c, s = np.cos(p * inv), np.sin(p * inv)
    a, b = x_LK[i, :half], x_LK[i, half:]
    out[i, :half] = a * c - b * s
    out[i, half:] = b * c + a * s
  return out


def qk_norm_ref(x_BLHK, scale, mode, eps):
  """RMSNorm per token over one head ("head", scale [Dh]) or over all heads ("full", [H, Dh]),
  written out for each (token, head) with plain sums."""
  b_, l_, h_, dh = x_BLHK.shape
  out = np.empty_like(x_BLHK)
  for b in range(b_):
    for i in range(l_):
      if mode == "full":
        flat = x_BLHK[b, i].reshape(-1)
        out[b, i] = x_BLHK[b, i] / math.sqrt(sum(flat * flat) / flat.size + eps) * scale
      else:
        for h in range(h_):
          row = x_BLHK[b, i, h]
          out[b, i, h] = row / math.sqrt(sum(row * row) / dh + eps) * scale
  return out


def attention_ref(cfg, p, x_BLD, pos_BL, seg_BL):
  """Plain loops, straight from the definition in moe/model/attention.py's docstring."""
  x = np.asarray(x_BLD, np.float64)
  g = lambda n: np.asarray(p[n], np.float64)
  q = np.einsum("bld,dhk->blhk", x, g("q_kernel"))
  k = np.einsum("bld,dnk->blnk", x, g("k_kernel"))
  v = np.einsum("bld,dnk->blnk", x, g("v_kernel"))
  if cfg.attention_bias or cfg.qkv_bias:
    q, k, v = q + g("q_bias"), k + g("k_bias"), v + g("v_bias")
  if cfg.qk_norm is not None:
    q = qk_norm_ref(q, np.asarray(p["q_norm"]["scale"], np.float64), cfg.qk_norm, cfg.norm_eps)
    k = qk_norm_ref(k, np.asarray(p["k_norm"]["scale"], np.float64), cfg.qk_norm, cfg.norm_eps)
  b_, l_, h_, dh = q.shape
  n_ = k.shape[2]
  out = np.zeros_like(q)
  for b in range(b_):
    for h in range(h_):
      kv = h // (h_ // n_)
      qh, kh = q[b, :, h], k[b, :, kv]
      if cfg.positions == "rope":
        qh = rope_ref(qh, pos_BL[b], cfg.rope_theta)
        kh = rope_ref(kh, pos_BL[b], cfg.rope_theta)
      for i in range(l_):
        vis = [j for j in range(l_) if j <= i and seg_BL[b, i] == seg_BL[b, j] != 0
               and (cfg.sliding_window is None or i - j < cfg.sliding_window)]
        if not vis:
          continue
        s = np.array([qh[i] @ kh[j] for j in vis]) / math.sqrt(dh)
        w = np.exp(s - s.max())
        w /= w.sum()
        out[b, i, h] = sum(wj * v[b, j, kv] for wj, j in zip(w, vis))
  y = np.einsum("blhk,hkd->bld", out, g("o_kernel"))
  if cfg.attention_bias:
    y = y + g("o_bias")
  return y


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_kv_heads=1, sliding_window=3),
    dict(num_kv_heads=4, attention_bias=True, positions="learned"),
    dict(sliding_window=1, rope_theta=100.0),
    # QK-norm on odd sizes (3 heads, 1 kv head, D=13, Dh=6), with q/k/v-only biases.
    dict(d_model=13, num_heads=3, num_kv_heads=1, head_dim=6, qk_norm="head", qkv_bias=True,
         norm_eps=1e-3),
    dict(d_model=13, num_heads=3, num_kv_heads=3, head_dim=6, qk_norm="full", norm_eps=1e-3),
    dict(qk_norm="full", attention_bias=True, positions="learned"),
])
def test_attention_matches_reference(kw):
  cfg = tiny(**kw)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(B, L, cfg.d_model)), jnp.float32)
  # Row 0: two segments then padding, positions restarting; row 1: one segment.
  seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [3] * L])
  pos = np.array([list(range(4)) + list(range(5)) + [0, 0], list(range(L))])
  attn = Attention(cfg)
  p = jax.jit(attn.init)(jax.random.key(1), x, jnp.asarray(pos), jnp.asarray(seg))["params"]
  p = nn.unbox(p)
  # Non-zero biases and QK-norm scales away from 1 so they are exercised.
  p = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), jnp.float32)
      if path[-1].key.endswith("bias") or path[-1].key == "scale" else a, p)
  if not (cfg.attention_bias or cfg.qkv_bias):
    assert not any("bias" in n for n in p)
  if cfg.qkv_bias and not cfg.attention_bias:
    assert {n for n in p if "bias" in n} == {"q_bias", "k_bias", "v_bias"}
  if cfg.qk_norm is not None:
    full = cfg.qk_norm == "full"
    assert p["q_norm"]["scale"].shape == ((cfg.num_heads,) if full else ()) + (cfg.head_dim,)
    assert p["k_norm"]["scale"].shape == ((cfg.num_kv_heads,) if full else ()) + (cfg.head_dim,)
  y = jax.jit(attn.apply)({"params": p}, x, jnp.asarray(pos), jnp.asarray(seg))
  ref = attention_ref(cfg, p, x, pos, seg)
  np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5, rtol=1e-4)
  # Padding queries see nothing: their output is the output bias (or 0).
  pad_out = np.asarray(p["o_bias"]) if cfg.attention_bias else 0.0
  np.testing.assert_allclose(np.asarray(y)[0, 9:], np.broadcast_to(pad_out, (2, cfg.d_model)),
                             atol=1e-6)


def test_sliding_window_receptive_field():
  W = 3
  cfg = tiny(num_layers=1, sliding_window=W)
  v = init(cfg)
  toks = tokens(8)
  base = np.asarray(fwd(cfg, v, toks))
  t = 8
  far = toks.at[:, t - W].set((toks[:, t - W] + 1) % V)  # just outside the window of t
  near = toks.at[:, t - W + 1].set((toks[:, t - W + 1] + 1) % V)  # the oldest token inside
  np.testing.assert_allclose(np.asarray(fwd(cfg, v, far))[:, t], base[:, t], atol=1e-6)
  assert np.abs(np.asarray(fwd(cfg, v, near))[:, t] - base[:, t]).max() > 1e-4
  # Without the window the far token is visible.
  cfg_full = dataclasses.replace(cfg, sliding_window=None)
  diff = np.asarray(fwd(cfg_full, v, far))[:, t] - np.asarray(fwd(cfg_full, v, toks))[:, t]
  assert np.abs(diff).max() > 1e-4


def test_gqa_equals_mha_with_repeated_kv():
  gqa = tiny(num_heads=4, num_kv_heads=2)
  mha = dataclasses.replace(gqa, num_kv_heads=4)
  v = nn.unbox(init(gqa)["params"])
  rep = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.repeat(x, 2, axis=1) if path[-1].key in ("k_kernel", "v_kernel") else x, v)
  toks = tokens(9)
  np.testing.assert_allclose(np.asarray(fwd(mha, {"params": rep}, toks)),
                             np.asarray(fwd(gqa, {"params": v}, toks)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# KV cache


def decode_configs():
  out = [pytest.param(tiny(), id="dense"),
         pytest.param(tiny(norm="layer", positions="learned", attention_bias=True,
                           mlp_activation="gelu", tie_embeddings=True), id="gpt2"),
         pytest.param(tiny(sliding_window=3, scan_layers=True, num_kv_heads=1), id="window_scan")]
  out.append(pytest.param(tiny(moe=dropless_moe(), moe_interval=2, first_moe_layer=1),
                          id="moe"))
  out.append(pytest.param(tiny(qk_norm="head", qkv_bias=True), id="qk_norm_head"))
  out.append(pytest.param(tiny(qk_norm="full", num_kv_heads=1), id="qk_norm_full"))
  out.append(pytest.param(tiny(moe=dropless_moe(), scan_layers=True), id="moe_scan",
                          marks=pytest.mark.slow))
  return out


@pytest.mark.parametrize("cfg", decode_configs())
def test_kv_cache_matches_full_forward(cfg):
  v = init(cfg)
  toks = tokens(15)
  full = np.asarray(fwd(cfg, v, toks))
  for prefill in (1, 4):
    logits, cache = decode_step_by_step(cfg, v, toks, prefill)
    np.testing.assert_allclose(logits, full, atol=1e-5, rtol=1e-5)
    assert int(cache["index"]) == L


def test_kv_cache_with_padded_prompt():
  """A left-padded prompt (segment 0) with explicit positions decodes like the unpadded one."""
  cfg = tiny()
  model = Transformer(cfg)
  v = init(cfg)
  prompt = tokens(16, 1, 5)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), prompt], axis=1)
  seg = jnp.asarray([[0] * pad + [1] * 5])
  pos = jnp.asarray([[0] * pad + list(range(5))])
  ref = np.asarray(fwd(cfg, v, prompt))
  logits, mut = run(cfg, {**v, "cache": init_cache(model, 1)}, padded, pos, seg, decode=True,
                    mutable=("cache",))
  np.testing.assert_allclose(np.asarray(logits)[:, pad:], ref, atol=1e-5, rtol=1e-5)
  nxt = tokens(17, 1, 1)
  ref2 = np.asarray(fwd(cfg, v, jnp.concatenate([prompt, nxt], axis=1)))[:, -1]
  out2, _ = run(cfg, {**v, "cache": mut["cache"]}, nxt, jnp.asarray([[5]]), decode=True,
                mutable=("cache",))
  np.testing.assert_allclose(np.asarray(out2)[:, 0], ref2, atol=1e-5, rtol=1e-5)


def test_decode_without_cache_is_an_error():
  cfg = tiny()
  v = init(cfg)
  with pytest.raises(ValueError, match="init_cache"):
    Transformer(cfg).apply(v, tokens(), decode=True, mutable=["cache"])
