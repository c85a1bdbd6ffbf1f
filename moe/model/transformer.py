"""A decoder-only Transformer LM whose feed-forward blocks may be MoE layers.

    logits_BLV = Transformer(config).apply(variables, tokens_BL, positions=None, segment_ids=None,
                                           train=False, decode=False, rngs=..., mutable=...)

- `positions` [B, L] int (default: 0..L-1, or the cache index onwards when decoding).
- `segment_ids` [B, L] int (default: all ones). 0 = padding. Attention is causal, never crosses
  segments and never looks at padding; MoE layers get `padding_mask = segment_ids != 0`.
- Logits are float32 [B, L, V]; compute runs in `config.dtype`, parameters are float32.
- Collections: `params`; `moe_bias` (the MoE balancing bias, when MoE layers exist);
  `intermediates` (each MoE layer sows its metrics under `.../moe/moe` and its routing under
  `.../moe/routing`; mutable to read them, `moe.layer.sown.per_layer` to split them per layer);
  `cache` (decode=True).

Parameter layout: `embedding_table` [V, D], `pos_embedding` [max_len, D] (learned positions),
blocks `block_{i}/{attn_norm, attn, mlp_norm, mlp | moe}` or, with scan_layers, one `blocks/...`
subtree whose leaves carry a leading layer axis (logical name 'layers'); the `intermediates`,
`moe_bias` and `cache` leaves of a scanned model carry that leading axis too. `final_norm/scale`
(+ `bias` for LayerNorm), and `output_kernel` [D, V] unless embeddings are tied. Attention:
`attn/{q,k,v,o}_kernel` [D, H, Dh], [D, N, Dh], [D, N, Dh], [H, Dh, D] (+ `_bias`), or with
`attention="mla"` the latent attention's (moe/model/mla.py). Dense MLP:
`mlp/w_in` [D, F], `mlp/w_gate` [D, F] (SwiGLU only), `mlp/w_out` [F, D] (+ `b_in`, `b_gate`,
`b_out`): the names of one expert's weights in `moe.layer.modules`, so upcycling copies them by
name.

Sharding: every parameter carries logical axis names and the main activations carry logical
constraints; they take effect under `jax.set_mesh(mesh)` + `nn.logical_axis_rules(LOGICAL_RULES)`
(the deprecated `with mesh:` leaves Flax's constraints inactive).

Decoding (autocomplete): `cache = init_cache(model, batch_size)`, then repeatedly
    logits, mut = model.apply({'params': p, 'cache': cache, ...}, chunk_BL, decode=True,
                              mutable=['cache'])
    cache = mut['cache']
with a prompt chunk of any length >= 1 first, then one token at a time. The cache holds keys and
values [B, S, N, Dh] per layer (MLA: the latent [B, S, kv_lora_rank] and the rotary key
[B, S, qk_rope_head_dim]), the segment id of each slot and one `index` (next slot to write);
rotary / learned positions default to index + 0..L-1. It has no rolling buffer: index + L must
stay <= S (S = init_cache's max_len, at most config.max_len).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.model.attention import Attention, kernel_init, project
from moe.errors import ConfigError
from moe.model.config import ModelConfig, validate_model
from moe.model.mla import LatentAttention
from moe.layer.activation import activate
from moe.layer.config import planned_k
from moe.layer.modules import MoeLayer


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class Norm(nn.Module):
  """RMSNorm (`norm="rms"`), or LayerNorm with a bias (`norm="layer"`); computed in float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    D = x.shape[-1]
    scale = self.param("scale", _partitioned(nn.initializers.ones, ("norm",)), (D,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if cfg.norm == "layer":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
    y = y * scale
    if cfg.norm == "layer":
      y = y + self.param("bias", _partitioned(nn.initializers.zeros, ("norm",)), (D,), jnp.float32)
    return y.astype(jnp.dtype(cfg.dtype))


class Mlp(nn.Module):
  """Dense FFN of width F = d_ff: SwiGLU `(silu(x W_gate) * x W_in) W_out` or GELU
  `gelu(x W_in) W_out`, with biases when `attention_bias`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    D, F = cfg.d_model, cfg.d_ff
    x_BLD = x_BLD.astype(dtype)

    def dense(name, shape, names, x):
      w = self.param(name, _partitioned(kernel_init(), names), shape, jnp.float32)
      y = project(x, w.astype(dtype), 1)
      if cfg.attention_bias:
        b_name = "b" + name[1:]  # w_in -> b_in
        y = y + self.param(b_name, _partitioned(nn.initializers.zeros, names[-1:]), shape[-1:],
                           jnp.float32).astype(dtype)
      return y

    h_BLF = dense("w_in", (D, F), ("embed", "mlp"), x_BLD)  # bld,df->blf
    g_BLF = None
    if cfg.mlp_activation == "swiglu":
      g_BLF = dense("w_gate", (D, F), ("embed", "mlp"), x_BLD)  # bld,df->blf
    h_BLF = activate(h_BLF, g_BLF, cfg.mlp_activation)  # the experts' activation (upcycling)
    h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "act_mlp"))
    return dense("w_out", (F, D), ("mlp", "embed"), h_BLF)  # blf,fd->bld


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)) with ffn dense or MoE.

  Returns (x, None) so the same module can be the body of `nn.scan`."""

  config: ModelConfig
  use_moe: bool = False
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache_index):
    cfg = self.config
    h = Norm(cfg, name="attn_norm")(x_BLD)
    attention = LatentAttention if cfg.attention == "mla" else Attention
    x_BLD = x_BLD + attention(cfg, decode=self.decode, name="attn")(
        h, positions_BL, segment_ids_BL, cache_index).astype(x_BLD.dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))
    h = Norm(cfg, name="mlp_norm")(x_BLD)
    if self.use_moe:
      y = MoeLayer(cfg.moe, dtype=jnp.dtype(cfg.dtype), causal=True, name="moe")(
          h, padding_mask=segment_ids_BL != 0, train=self.train)
    else:
      y = Mlp(cfg, name="mlp")(h)
    x_BLD = x_BLD + y.astype(x_BLD.dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))
    return x_BLD, None


class Transformer(nn.Module):
  """Decoder-only LM. See the module docstring for the call signature and collections."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL, positions=None, segment_ids=None, train: bool = False,
               decode: bool = False):
    cfg = self.config
    validate_model(cfg)  # the guard for a ModelConfig built in code; entry points check earlier
    dtype = jnp.dtype(cfg.dtype)
    if tokens_BL.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens_BL.shape}")
    B, L = tokens_BL.shape
    if L > cfg.max_len:
      raise ConfigError(f"sequence length {L} exceeds model.max_len={cfg.max_len}; "
                        "raise model.max_len or shorten the input")

    cache_index = None
    if decode:
      if not self.is_initializing() and (not self.has_variable("cache", "index")
                                         or not self.is_mutable_collection("cache")):
        raise ValueError("decode=True needs the cache: pass variables['cache'] = "
                         "init_cache(model, batch_size) and mutable=['cache']")
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if not self.is_initializing():
        cache_index = index.value
      else:
        cache_index = jnp.zeros((), jnp.int32)
    positions, segment_ids = _default_positions(positions, segment_ids, B, L, cache_index)

    # Embedding std 1/sqrt(D): unit-scale logits when tied; pre-norm blocks normalise their
    # input, so the residual stream's initial scale does not matter to the first block.
    embedding = self.param("embedding_table", _partitioned(
        nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.d_model), jnp.float32)
    x_BLD = jnp.take(embedding, tokens_BL, axis=0).astype(dtype)
    if cfg.positions == "learned":
      pos_table = self.param("pos_embedding", _partitioned(
          nn.initializers.normal(stddev=cfg.d_model ** -0.5), (None, "embed")),
                             (cfg.max_len, cfg.d_model), jnp.float32)
      x_BLD = x_BLD + jnp.take(pos_table, positions, axis=0).astype(dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))

    x_BLD = _blocks(cfg, x_BLD, positions, segment_ids, cache_index, train, decode)
    x_BLD = Norm(cfg, name="final_norm")(x_BLD)
    logits_BLV = self._output_logits(x_BLD, embedding, dtype)

    if decode and not self.is_initializing():
      index.value = cache_index + L
    return logits_BLV

  def _output_logits(self, x_BLD, embedding, dtype):
    """float32 logits [B, L, V]: the tied embedding or an output kernel, then the soft cap."""
    cfg = self.config
    if cfg.tie_embeddings:
      logits_BLV = project(x_BLD, embedding.astype(dtype).T, 1,
                           preferred_element_type=jnp.float32)  # "bld,vd->blv"
    else:
      w_out = self.param("output_kernel", _partitioned(kernel_init(), ("embed", "vocab")),
                         (cfg.d_model, cfg.vocab_size), jnp.float32)
      logits_BLV = project(x_BLD, w_out.astype(dtype), 1,
                           preferred_element_type=jnp.float32)  # "bld,dv->blv"
    logits_BLV = logits_BLV.astype(jnp.float32)
    if cfg.logits_soft_cap is not None:
      cap = cfg.logits_soft_cap
      logits_BLV = cap * jnp.tanh(logits_BLV / cap)
    return nn.with_logical_constraint(logits_BLV, ("batch", "length", "act_vocab"))


def _default_positions(positions, segment_ids, B, L, cache_index):
  """int32 positions (default: 0.., or the cache index on) and segment ids (default: all 1)."""
  if positions is None:
    start = 0 if cache_index is None else cache_index
    positions = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
  if segment_ids is None:
    segment_ids = jnp.ones((B, L), jnp.int32)
  return positions.astype(jnp.int32), segment_ids.astype(jnp.int32)


def _blocks(cfg, x_BLD, positions, segment_ids, cache_index, train, decode):
  """The num_layers blocks, as one `nn.scan` ("blocks", params stacked on a "layers" axis) or
  unrolled ("block_0", ...); called inside Transformer.__call__, so they are its submodules."""
  block_cls = Block
  if cfg.remat:
    block_cls = nn.remat(Block, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(block_cls,
                      variable_axes={"params": 0, "cache": 0, "intermediates": 0, "moe_bias": 0},
                      split_rngs={"params": True, "jitter": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x_BLD, _ = scanned(cfg, use_moe=cfg.moe is not None, train=train, decode=decode,
                       name="blocks")(x_BLD, positions, segment_ids, cache_index)
    return x_BLD
  for i in range(cfg.num_layers):
    x_BLD, _ = block_cls(cfg, use_moe=cfg.is_moe_layer(i), train=train, decode=decode,
                         name=f"block_{i}")(x_BLD, positions, segment_ids, cache_index)
  return x_BLD


def init_cache(model: Transformer, batch_size: int, max_len: int | None = None):
  """A zeroed `cache` collection for decoding `batch_size` rows up to `max_len` tokens
  (default config.max_len). Shapes come from `jax.eval_shape`, so nothing is computed."""
  cfg = model.config
  S = cfg.max_len if max_len is None else max_len
  if not 1 <= S <= cfg.max_len:
    raise ConfigError(f"init_cache max_len must be in [1, model.max_len={cfg.max_len}], got {S}")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((batch_size, S), jnp.int32), decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def count_params(params) -> int:
  """Number of scalars in a (boxed or unboxed, concrete or abstract) parameter tree."""
  leaves = jax.tree.leaves(nn.unbox(params))
  return int(sum(math.prod(x.shape) for x in leaves))


def param_shapes(cfg: ModelConfig):
  """The unboxed `params` tree of ShapeDtypeStructs (nothing is computed)."""
  model = Transformer(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.unbox(shapes["params"])


def active_params(cfg: ModelConfig) -> int:
  """Parameters used per token: everything except the routed experts a token does not pick,
  i.e. total - (E - K)/E of every MoE layer's `experts/...` weights (router, shared experts,
  attention, norms and embeddings count in full; a tied embedding counts once). With an adaptive
  k, K is the planned one (`moe.layer.config.planned_k`: the target mean k, or k_max under a
  fixed threshold), as in the model FLOPs; the measured mean k is logged as `moe/mean_k`."""
  params = param_shapes(cfg)
  total = count_params(params)
  if cfg.moe is None:
    return total
  routed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(p, "key", None) for p in path]
    if "moe" in keys and "experts" in keys:
      routed += math.prod(leaf.shape)
  E, K = cfg.moe.num_experts, planned_k(cfg.moe)
  return total - round(routed * (E - K) / E)
