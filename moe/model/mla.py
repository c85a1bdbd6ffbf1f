"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a KV cache of the compressed latent.

`model.attention="mla"` puts this module in place of `moe.model.attention.Attention` (same call,
same mask: see that module's docstring). Letters: B batch, L query length, S key length (L, or
the cache length when decoding), H heads, D model width, Rq (Q in names) = q_lora_rank,
R (C in names) = kv_lora_rank, Dn (N) = qk_nope_head_dim, Dr (P) = qk_rope_head_dim,
Dv (V) = v_head_dim.

    queries   q = x Wq                       [B, L, H, Dn + Dr]   (q_lora_rank=None)
              q = rms(x Wqa + bqa) Wqb                            (low-rank queries)
    latent    c = rms(x Wkva + bkva)         [B, L, R]    one per token, shared by every head
    rope key  kr = rope(x Wkr + bkr)         [B, L, Dr]   one per token, shared by every head
    keys      k_h = [c Wkb_h, kr]            [B, S, H, Dn + Dr]
    values    v_h = c Wvb_h                  [B, S, H, Dv]
    scores    (q_nope . k_nope + q_rope . kr) * s, masked, softmax (float32)
    output    y = concat_h(softmax v_h) Wo (+ bo)                 [B, L, D]

with s = (Dn + Dr)^-0.5, times mscale(rope_factor, rope_mscale_all_dim)^2 with
`model.rope_type="yarn"` and rope_mscale_all_dim set (DeepSeek's YaRN checkpoints; see
`moe.model.attention.softmax_scale`).

rope is the "rotate half" rotary embedding of `moe.model.attention.apply_rope` over the last Dr
features of each query head and over kr. With `rope_interleave` the Dr features are rotated as
adjacent pairs (x0, x1), (x2, x3), ... instead (DeepSeek's checkpoints): here that is the
rotate-half rotation of the features reordered evens-then-odds, which is what Hugging Face's
`apply_rotary_pos_emb_interleave` computes (its output comes out in that reordered layout; since
queries and keys are reordered alike, the scores are those of DeepSeek-V2's complex rotation
too). `rms` is an RMSNorm with a learned scale and eps 1e-6 (DeepSeek's latent norms, which do
not follow `model.norm_eps`). Biases (`model.attention_bias`) sit where DeepSeek puts them: on
Wqa, Wkva/Wkr and Wo.

Parameters (`attn/...`): `q_kernel` [D, H, Dn+Dr], or `q_a_kernel` [D, Rq], `q_a_norm_scale`
[Rq], `q_b_kernel` [Rq, H, Dn+Dr]; `kv_a_kernel` [D, R], `kv_a_norm_scale` [R], `k_rope_kernel`
[D, Dr], `k_b_kernel` [R, H, Dn], `v_b_kernel` [R, H, Dv], `o_kernel` [H, Dv, D]; with biases
`q_a_bias` [Rq], `kv_a_bias` [R], `k_rope_bias` [Dr], `o_bias` [D]. Logical axes: `embed`,
`heads`, `head_dim` as in attention.py and `latent` (replicated) for Rq and R.

KV cache (decode=True): `cached_latent` [B, S, R] (c after its norm), `cached_rope_key`
[B, S, Dr] (kr after rotation) and `cached_segment` [B, S]; per-head keys and values are
re-expanded from the latent at every step. That is (R + Dr) numbers per token and layer instead
of 2 H Dh for multi-head attention.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.model.attention import (apply_rope, attention_mask, decode_cache, kernel_init, project,
                                 rope_frequencies, softmax_scale)
from moe.model.config import ModelConfig

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm
_MASKED = -1e30  # finite stand-in for -inf, as in attention.py


def deinterleave(x):
  """[..., K] -> the even features, then the odd ones (pairs (x0, x1) -> halves)."""
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def rotate(x_BLHK, positions_BL, cfg: ModelConfig):
  """The rotary embedding of MLA's rope features (see the module docstring)."""
  if cfg.rope_interleave:
    x_BLHK = deinterleave(x_BLHK)
  inv_freq_K, scale = rope_frequencies(cfg, x_BLHK.shape[-1])
  return apply_rope(x_BLHK, positions_BL, inv_freq_K, scale)


def latent_attention(q_nope_BLHN, q_rope_BLHP, k_nope_BSHN, k_rope_BSP, v_BSHV, mask_BLS, scale):
  """Softmax attention with a rope key shared by all heads; float32 scores. -> [B, L, H, Dv]."""
  scores_BHLS = jnp.einsum("blhn,bshn->bhls", q_nope_BLHN, k_nope_BSHN,
                           preferred_element_type=jnp.float32)
  scores_BHLS += jnp.einsum("blhp,bsp->bhls", q_rope_BLHP, k_rope_BSP,
                            preferred_element_type=jnp.float32)
  scores_BHLS *= scale
  mask_B1LS = mask_BLS[:, None]
  scores_BHLS = jnp.where(mask_B1LS, scores_BHLS, _MASKED)
  probs_BHLS = jax.nn.softmax(scores_BHLS, axis=-1)
  probs_BHLS = jnp.where(mask_B1LS, probs_BHLS, 0.0)  # rows with nothing visible -> 0
  return jnp.einsum("bhls,bshv->blhv", probs_BHLS.astype(v_BSHV.dtype), v_BSHV)


class LatentAttention(nn.Module):
  """MLA; the same call as `Attention` (x_BLD, positions_BL, segment_ids_BL, cache_index)."""

  config: ModelConfig
  decode: bool = False

  def _kernel(self, name, shape, names, fan_in_axes=(0,)):
    return self.param(name, nn.with_logical_partitioning(kernel_init(fan_in_axes), names), shape,
                      jnp.float32).astype(jnp.dtype(self.config.dtype))

  def _dense(self, name, shape, names, x, bias):
    y = project(x, self._kernel(f"{name}_kernel", shape, names), 1)
    if bias and self.config.attention_bias:
      b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   names[1:]),
                     shape[1:], jnp.float32)
      y = y + b.astype(y.dtype)
    return y

  def _rms(self, name, x):
    scale = self.param(name, nn.with_logical_partitioning(nn.initializers.ones, ("latent",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + LATENT_NORM_EPS)
    return (y * scale).astype(x.dtype)

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache_index=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    D, H, R = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
    Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    B, L, _ = x_BLD.shape
    x_BLD = x_BLD.astype(dtype)

    if cfg.q_lora_rank is None:
      q_BLHK = self._dense("q", (D, H, Dn + Dr), ("embed", "heads", "head_dim"), x_BLD, False)
    else:
      Rq = cfg.q_lora_rank
      cq_BLQ = self._rms("q_a_norm_scale",
                         self._dense("q_a", (D, Rq), ("embed", "latent"), x_BLD, True))
      q_BLHK = self._dense("q_b", (Rq, H, Dn + Dr), ("latent", "heads", "head_dim"), cq_BLQ,
                           False)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ("batch", "length", "act_heads", None))
    q_nope_BLHN, q_rope_BLHP = q_BLHK[..., :Dn], q_BLHK[..., Dn:]
    q_rope_BLHP = rotate(q_rope_BLHP, positions_BL, cfg)

    c_BLC = self._rms("kv_a_norm_scale",
                      self._dense("kv_a", (D, R), ("embed", "latent"), x_BLD, True))
    k_rope_BLP = self._dense("k_rope", (D, Dr), ("embed", "head_dim"), x_BLD, True)
    k_rope_BLP = rotate(k_rope_BLP[:, :, None, :], positions_BL, cfg)[:, :, 0, :]

    q_index_L = jnp.arange(L, dtype=jnp.int32)
    k_index_S, k_segment_BS = q_index_L, segment_ids_BL
    if self.decode:
      # The cache holds the latent and the rotated rope key of each slot (`decode_cache`).
      cached, q_index_L, k_index_S, k_segment_BS = decode_cache(
          self, {"cached_latent": c_BLC, "cached_rope_key": k_rope_BLP}, segment_ids_BL,
          cache_index, dtype)
      c_BLC, k_rope_BLP = cached["cached_latent"], cached["cached_rope_key"]

    # Per-head keys and values re-expanded from the latent (the latent axis contracted).
    k_nope_BSHN = project(c_BLC, self._kernel("k_b_kernel", (R, H, Dn),
                                              ("latent", "heads", "head_dim")), 1)
    v_BSHV = project(c_BLC, self._kernel("v_b_kernel", (R, H, Dv),
                                         ("latent", "heads", "head_dim")), 1)
    k_nope_BSHN = nn.with_logical_constraint(k_nope_BSHN, ("batch", "length", "act_heads", None))
    v_BSHV = nn.with_logical_constraint(v_BSHV, ("batch", "length", "act_heads", None))

    mask_BLS = attention_mask(q_index_L, k_index_S, segment_ids_BL, k_segment_BS,
                              cfg.sliding_window)
    out_BLHV = latent_attention(q_nope_BLHN, q_rope_BLHP, k_nope_BSHN, k_rope_BLP, v_BSHV,
                                mask_BLS, softmax_scale(cfg, Dn + Dr))
    out_BLHV = nn.with_logical_constraint(out_BLHV, ("batch", "length", "act_heads", None))
    y_BLD = project(out_BLHV, self._kernel("o_kernel", (H, Dv, D), ("heads", "head_dim", "embed"),
                                           (0, 1)), 2)
    if cfg.attention_bias:
      b = self.param("o_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                     (D,), jnp.float32)
      y_BLD = y_BLD + b.astype(dtype)
    return y_BLD
