"""Causal multi-head attention with grouped-query heads, rotary positions and a KV cache.

Letters: B batch, L length (of the query chunk), S length of the keys (L, or the cache length when
decoding), H query heads, N key/value heads (N divides H; H/N query heads share one kv head),
Dh head width, D model width.

Mask: a query attends to a key iff
  key index <= query index (causal; indices are positions in the row, or cache slots when
  decoding), AND both carry the same segment id, AND that id is not 0 (padding), AND, with a
  sliding window W, query index - key index < W (the query sees at most W tokens, itself
  included, as in Mistral).
A query that can see nothing (a padding token) gets a zero output instead of NaN.

QK-norm (`model.qk_norm`): queries and keys are RMS-normalised (float32, eps = model.norm_eps, a
learned float32 scale) right after their projection (and bias), before rotary positions: "head"
normalises each head's Dh values with one scale [Dh] shared by the heads (Qwen3); "full"
normalises all H*Dh query values of a token together (all N*Dh key values), scales [H, Dh] and
[N, Dh] (OLMoE). Params `attn/q_norm/scale`, `attn/k_norm/scale`. The KV cache holds the
normalised, rotated keys.

Rotary positions (`model.positions="rope"`): `rope_frequencies` gives the inverse frequencies
and the scale of cos/sin for `model.rope_type`: "default" (theta^(-2i/Dh)), "llama3" (Llama
3.1's smooth division of the long wavelengths by rope_factor) or "yarn" (YaRN's ramp between
interpolated and original frequencies, cos/sin times its attention factor), as Hugging Face's
rope_parameters define them; the softmax scale stays Dh^-0.5 here (`softmax_scale` is MLA's).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe.model.config import ModelConfig


def project(x, w, num_contract: int, preferred_element_type=None):
  """x[..., c1..cn] contracted with w[c1..cn, o1..om] -> [..., o1..om], as ONE 2-D matmul.

  Same result as the einsum, but XLA on CPU takes a much slower path for the weight gradient
  of a 3-D einsum (measured 2x slower fwd+bwd for the default model's FFN); a reshape to
  [tokens, features] is free. The trailing axes of x must be w's leading axes, in order.
  """
  lead = x.shape[:x.ndim - num_contract]
  k = math.prod(w.shape[:num_contract])
  out = w.shape[num_contract:]
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)

# Finite stand-in for -inf so a fully masked row stays NaN-free before we zero it.
_MASKED = -1e30


def kernel_init(fan_in_axes: tuple[int, ...] = (0,)):
  """Lecun-normal (truncated) over the given fan-in axes."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=fan_in_axes,
                                          out_axis=-1)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """[Dh/2] float32 inverse frequencies theta^(-2i/Dh) (unscaled rotary positions)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3_inv_freq(inv_K: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """Llama 3.1: wavelengths above original/low_freq_factor divided by factor, below
  original/high_freq_factor kept, a smooth blend in between."""
  old = cfg.rope_original_max_len or cfg.max_len
  low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
  wavelen_K = 2 * math.pi / inv_K
  scaled_K = np.where(wavelen_K > old / low, inv_K / factor, inv_K)
  smooth_K = (old / wavelen_K - low) / (high - low)
  smoothed_K = (1 - smooth_K) * scaled_K / factor + smooth_K * scaled_K
  medium_K = ~(wavelen_K < old / high) & ~(wavelen_K > old / low)
  return np.where(medium_K, smoothed_K, scaled_K)


def _yarn_inv_freq(inv_K: np.ndarray, dim: int, cfg: ModelConfig) -> np.ndarray:
  """YaRN: features rotating more than beta_fast times over the original length keep their
  frequency, those under beta_slow times are interpolated (divided by factor), a linear ramp
  between."""
  old = cfg.rope_original_max_len or cfg.max_len

  def correction_dim(rotations):
    return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp_K = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  keep_K = 1 - ramp_K  # weight of the unscaled (extrapolated) frequency
  return inv_K / cfg.rope_factor * (1 - keep_K) + inv_K * keep_K


def rope_frequencies(cfg: ModelConfig, dim: int) -> tuple[jax.Array, float]:
  """([dim/2] float32 inverse frequencies, scale of cos and sin) for `dim` rotated features, as
  `model.rope_type` says (the formulas of transformers' modeling_rope_utils): "default" is
  theta^(-2i/dim) and scale 1; "llama3" and "yarn" rescale the frequencies (computed in float64
  from the static config, then float32), and "yarn" scales cos and sin by its attention factor
  (rope_attention_factor, else mscale(factor, rope_mscale) / mscale(factor, rope_mscale_all_dim)
  when both are set, else mscale(factor))."""
  if cfg.rope_type == "default":
    return rope_inv_freq(dim, cfg.rope_theta), 1.0
  inv_K = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if cfg.rope_type == "llama3":
    return jnp.asarray(_llama3_inv_freq(inv_K, cfg), jnp.float32), 1.0
  scale = cfg.rope_attention_factor
  if scale is None:
    f = cfg.rope_factor
    scale = (yarn_mscale(f, cfg.rope_mscale) / yarn_mscale(f, cfg.rope_mscale_all_dim)
             if cfg.rope_mscale and cfg.rope_mscale_all_dim else yarn_mscale(f))
  return jnp.asarray(_yarn_inv_freq(inv_K, dim, cfg), jnp.float32), float(scale)


def softmax_scale(cfg: ModelConfig, dim: int) -> float:
  """The attention logits' scale for query/key width `dim`: dim^-0.5. Multi-latent attention
  (DeepSeek) with a scaled rope_type and rope_mscale_all_dim multiplies it by
  mscale(factor, rope_mscale_all_dim)^2, as transformers' DeepSeek-V2/V3 do (its callers decide;
  Llama/Qwen attention does not)."""
  scale = dim ** -0.5
  if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
  return scale


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, inv_freq_K: jax.Array,
               scale: float = 1.0) -> jax.Array:
  """Rotary embedding, "rotate half" layout (first half of the head rotates with the second half,
  the layout of Hugging Face Llama/Mixtral checkpoints), with inverse frequencies [Dh/2] and cos
  and sin multiplied by `scale` (see rope_frequencies). Computed in float32."""
  angles_BLK = positions_BL.astype(jnp.float32)[..., None] * inv_freq_K
  sin = jnp.sin(angles_BLK)[:, :, None, :]
  cos = jnp.cos(angles_BLK)[:, :, None, :]
  if scale != 1.0:
    sin, cos = sin * scale, cos * scale
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def attention_mask(q_index_L, k_index_S, q_segment_BL, k_segment_BS, sliding_window):
  """Boolean [B, L, S] mask (see the module docstring)."""
  diff_LS = q_index_L[:, None] - k_index_S[None, :]
  allowed_LS = diff_LS >= 0
  if sliding_window is not None:
    allowed_LS &= diff_LS < sliding_window
  same_BLS = q_segment_BL[:, :, None] == k_segment_BS[:, None, :]
  real_BL1 = (q_segment_BL != 0)[:, :, None]
  return allowed_LS[None] & same_BLS & real_BL1


def dot_product_attention(q_BLHK, k_BSNK, v_BSNK, mask_BLS):
  """Grouped-query softmax attention; scores and softmax in float32. Returns [B, L, H, Dh]."""
  B, L, H, Dh = q_BLHK.shape
  N = k_BSNK.shape[2]
  q_BLNGK = q_BLHK.reshape(B, L, N, H // N, Dh)  # query head h uses kv head h // (H/N)
  scores_BNGLS = jnp.einsum("blngk,bsnk->bngls", q_BLNGK, k_BSNK,
                            preferred_element_type=jnp.float32) * (Dh ** -0.5)
  mask_B11LS = mask_BLS[:, None, None]
  scores_BNGLS = jnp.where(mask_B11LS, scores_BNGLS, _MASKED)
  probs_BNGLS = jax.nn.softmax(scores_BNGLS, axis=-1)
  probs_BNGLS = jnp.where(mask_B11LS, probs_BNGLS, 0.0)  # rows with nothing visible -> 0
  out_BLNGK = jnp.einsum("bngls,bsnk->blngk", probs_BNGLS.astype(v_BSNK.dtype), v_BSNK)
  return out_BLNGK.reshape(B, L, H, Dh)


class QkNorm(nn.Module):
  """RMSNorm of queries or keys [B, L, heads, Dh] over the last axis ("head") or the last two
  ("full"); computed in float32, returned in the input's dtype. Param `scale` [Dh] or [heads, Dh]."""

  mode: str  # "head" | "full"
  eps: float
  heads_axis: str  # logical name of the heads axis: "heads" | "kv_heads"

  @nn.compact
  def __call__(self, x_BLHK):
    full = self.mode == "full"
    shape = x_BLHK.shape[-2:] if full else x_BLHK.shape[-1:]
    names = (self.heads_axis, "head_dim") if full else ("head_dim",)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, names), shape,
                       jnp.float32)
    x32 = x_BLHK.astype(jnp.float32)
    axes = (-2, -1) if full else (-1,)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + self.eps)
    return (y * scale).astype(x_BLHK.dtype)


def decode_cache(module: nn.Module, entries: dict, segment_ids_BL, cache_index, dtype):
  """One attention layer's decode cache: each entry [B, L, ...] is written at `cache_index` into
  the `cache` variable of its name [B, S, ...], beside `cached_segment` [B, S], the segment id of
  each slot (0 = empty, so slots not yet written are masked like padding). S is fixed by the
  input that created the cache (see model.init_cache); chunks written past the end are clamped
  by dynamic_update_slice, so the caller keeps index + L <= S (generation stops there).

  Returns (the cached arrays [B, S, ...] by name, query slots [L], key slots [S], key segments
  [B, S]); while initializing, the entries themselves with the chunk's own slots and segments.
  """
  B, L = segment_ids_BL.shape
  variables = {name: module.variable("cache", name, jnp.zeros, x.shape, dtype)
               for name, x in entries.items()}
  cs = module.variable("cache", "cached_segment", jnp.zeros, (B, L), jnp.int32)
  index_L = jnp.arange(L, dtype=jnp.int32)
  if module.is_initializing():
    return entries, index_L, index_L, segment_ids_BL
  S = cs.value.shape[1]
  if L > S:
    raise ValueError(f"decode chunk of length {L} exceeds the cache length {S} "
                     f"(model.max_len / init_cache max_len)")
  for name, x in entries.items():
    var = variables[name]
    var.value = jax.lax.dynamic_update_slice(var.value, x.astype(dtype),
                                             (0, cache_index) + (0,) * (x.ndim - 2))
  cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids_BL.astype(jnp.int32),
                                          (0, cache_index))
  cached = {name: var.value for name, var in variables.items()}
  return cached, cache_index + index_L, jnp.arange(S, dtype=jnp.int32), cs.value


class Attention(nn.Module):
  """Causal self-attention. Params: q [D,H,Dh], k/v [D,N,Dh], o [H,Dh,D] (+ biases, QK-norm)."""

  config: ModelConfig
  decode: bool = False

  def _proj(self, name, shape, names, fan_in_axes, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    w = self.param(f"{name}_kernel", nn.with_logical_partitioning(kernel_init(fan_in_axes), names),
                   shape, jnp.float32)
    y = project(x, w.astype(dtype), len(fan_in_axes))
    if cfg.attention_bias or (cfg.qkv_bias and name in ("q", "k", "v")):
      b_shape = shape[len(fan_in_axes):]
      b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   names[len(fan_in_axes):]),
                     b_shape, jnp.float32)
      y = y + b.astype(dtype)
    return y

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache_index=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    D, H, N, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, L, _ = x_BLD.shape
    x_BLD = x_BLD.astype(dtype)

    q = self._proj("q", (D, H, Dh), ("embed", "heads", "head_dim"), (0,), x_BLD)  # bld,dhk->blhk
    k = self._proj("k", (D, N, Dh), ("embed", "kv_heads", "head_dim"), (0,), x_BLD)  # bld,dnk->blnk
    v = self._proj("v", (D, N, Dh), ("embed", "kv_heads", "head_dim"), (0,), x_BLD)  # bld,dnk->blnk
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
    k = nn.with_logical_constraint(k, ("batch", "length", "act_kv_heads", None))
    v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", None))
    if cfg.qk_norm is not None:
      q = QkNorm(cfg.qk_norm, cfg.norm_eps, "heads", name="q_norm")(q)
      k = QkNorm(cfg.qk_norm, cfg.norm_eps, "kv_heads", name="k_norm")(k)
    if cfg.positions == "rope":
      inv_freq_K, rope_scale = rope_frequencies(cfg, Dh)
      q = apply_rope(q, positions_BL, inv_freq_K, rope_scale)
      k = apply_rope(k, positions_BL, inv_freq_K, rope_scale)

    q_index_L = jnp.arange(L, dtype=jnp.int32)
    k_index_S, k_segment_BS = q_index_L, segment_ids_BL
    if self.decode:
      # Cache of keys/values [B, S, N, Dh] (see `decode_cache`).
      cached, q_index_L, k_index_S, k_segment_BS = decode_cache(
          self, {"cached_key": k, "cached_value": v}, segment_ids_BL, cache_index, dtype)
      k, v = cached["cached_key"], cached["cached_value"]

    mask_BLS = attention_mask(q_index_L, k_index_S, segment_ids_BL, k_segment_BS,
                              cfg.sliding_window)
    out_BLHK = dot_product_attention(q, k, v, mask_BLS)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ("batch", "length", "act_heads", None))
    # blhk,hkd->bld
    y_BLD = self._proj("o", (H, Dh, D), ("heads", "head_dim", "embed"), (0, 1), out_BLHK)
    return y_BLD
