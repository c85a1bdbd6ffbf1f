"""Tiny Transformer configs and fast helpers shared by test_model.py and test_attention.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe.model.config import ModelConfig
from moe.layer.config import MoeConfig
from moe.model.transformer import Transformer, init_cache

B, L, V = 2, 11, 37


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=V, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              d_ff=24, max_len=16)
  base.update(kw)
  return ModelConfig(**base)


def dropless_moe(**kw) -> MoeConfig:
  # Dropless routing: a token's output depends on that token alone. With a capacity, which
  # assignments overflow depends on the other tokens of the group (including later ones), so
  # causality, packing and cache equivalence would not hold exactly.
  base = dict(num_experts=4, num_selected=2, expert_hidden=12, capacity_factor=None,
              eval_capacity_factor=None)
  base.update(kw)
  return MoeConfig(**base)


def tokens(seed=0, b=B, l=L):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, l)), jnp.int32)


def abstract_vars(cfg, toks=None):
  """Boxed ShapeDtypeStructs of every collection `init` makes (traced, nothing compiled)."""
  toks = tokens() if toks is None else toks
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), toks))


def real_init(cfg, toks=None, seed=0):
  toks = tokens() if toks is None else toks
  return jax.jit(Transformer(cfg).init)(jax.random.key(seed), toks)


def init(cfg, toks=None, seed=0):
  """Random variables with the model's exact tree and shapes, drawn with numpy: compiling the
  real initializers costs more than every forward pass here (test_init_* covers them). Norm
  scales near 1 and biases non-zero so that every parameter matters."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(abstract_vars(cfg, toks))

  def draw(path, s):
    name = str(path[-1].key)
    if name == "scale":
      x = 1.0 + 0.1 * rng.normal(size=s.shape)
    elif "bias" in name:
      x = 0.1 * rng.normal(size=s.shape)
    else:
      x = 0.25 * rng.normal(size=s.shape)
    return jnp.asarray(x, s.dtype)

  out = {"params": jax.tree_util.tree_map_with_path(draw, shapes["params"])}
  for col, tree in shapes.items():
    if col != "params":
      out[col] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  return out


_JITTED = {}


def run(cfg, variables, toks, positions=None, segment_ids=None, rngs=None, **static):
  """Jitted `apply` (one compile per config, static options and shape; op-by-op is slower).
  `static`: train, decode, mutable (tuple), capture_intermediates."""
  key = (cfg, tuple(sorted(static.items())))
  if key not in _JITTED:
    st = dict(static)
    if "mutable" in st:
      st["mutable"] = list(st["mutable"])
    _JITTED[key] = jax.jit(lambda v, t, p, s, r: Transformer(cfg).apply(
        v, t, positions=p, segment_ids=s, rngs=r, **st))
  return _JITTED[key](variables, toks, positions, segment_ids, rngs)


def fwd(cfg, variables, toks, positions=None, segment_ids=None):
  return run(cfg, variables, toks, positions, segment_ids)


_DECODE_STEPS = {}


def decode_step_by_step(cfg, variables, toks, prefill):
  """Cached decoding of `toks` [B, L]: a prompt chunk of `prefill` tokens, then one token at a
  time (jitted once per config). Returns (every step's logits concatenated [B, L, V], the final
  cache)."""
  model = Transformer(cfg)
  if cfg not in _DECODE_STEPS:
    _DECODE_STEPS[cfg] = jax.jit(lambda rest, c, t: model.apply(
        {**rest, "cache": c}, t, decode=True, mutable=["cache"]))
  step = _DECODE_STEPS[cfg]
  rest = {k: x for k, x in variables.items() if k != "cache"}
  logits, mut = step(rest, init_cache(model, toks.shape[0]), toks[:, :prefill])
  outs = [np.asarray(logits)]
  for t in range(prefill, toks.shape[1]):
    logits, mut = step(rest, mut["cache"], toks[:, t:t + 1])
    outs.append(np.asarray(logits))
  return np.concatenate(outs, axis=1), mut["cache"]


DENSE_VARIANTS = {
    "default": {},
    "gpt2_style": dict(norm="layer", positions="learned", attention_bias=True,
                       mlp_activation="gelu", tie_embeddings=True),
    "mqa_softcap": dict(num_kv_heads=1, logits_soft_cap=3.0),
    "window": dict(sliding_window=3),
}


def stack_blocks(params, num_layers):
  """Unscanned params (block_0..block_{n-1}) -> scanned layout (`blocks`, leading layer axis)."""
  params = dict(params)
  blocks = [params.pop(f"block_{i}") for i in range(num_layers)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params
