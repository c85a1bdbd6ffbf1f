"""MoeLayer against a manual per-token computation, plus dtypes, padding, bias, sown metrics and
configuration errors."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.errors import ConfigError
from moe.layer.config import MoeConfig
from moe.layer.modules import MoeLayer, Router

B, L, D, F, E = 2, 7, 8, 6, 5
SOWN_KEYS = {"aux_loss", "load_balance_loss", "z_loss", "load", "max_over_mean_load",
             "dropped_fraction", "tokens_dropped_fraction", "router_entropy", "top1_prob",
             "mean_k", "mean_kept_k", "k_hist", "active_expert_flops_per_token", "top_p",
             "bias_norm"}


def cfg_(**kw) -> MoeConfig:
  base = dict(num_experts=E, num_selected=2, expert_hidden=F, capacity_factor=1.0,
              eval_capacity_factor=2.0, min_capacity=1, dispatch="reference")
  base.update(kw)
  return MoeConfig(**base)


def _x(seed, b=B, l=L, d=D):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, l, d), jnp.float32)


def _mask(seed, b=B, l=L, p=0.25):
  return np.random.default_rng(seed).random((b, l)) > p


def make_variables(layer, x, seed=0, mask=None):
  """Random variables of the right shapes and logical names, without compiling `init` (slow on
  CPU): shapes from `jax.eval_shape`, values from numpy (moe_bias stays zero)."""
  shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, padding_mask=mask))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if "moe_bias" in jax.tree_util.keystr(path):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(s.shape[-2]), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _compiled(cfg, dtype, causal, train, mutable):
  layer = MoeLayer(cfg, dtype=dtype, causal=causal)
  return layer, jax.jit(lambda v, x, m, rngs: layer.apply(v, x, padding_mask=m, train=train,
                                                          mutable=list(mutable), rngs=rngs))


def _run(cfg, x, mask=None, *, train=False, seed=0, dtype=jnp.float32, causal=False,
         variables=None, mutable=("intermediates",), rngs=None):
  """(variables, y, mutated collections); one compilation per (config, dtype, mode, shapes)."""
  layer, fn = _compiled(cfg, dtype, causal, train, tuple(mutable))
  if variables is None:
    variables = make_variables(layer, x, seed, mask)
  y, state = fn(variables, x, mask, rngs)
  return variables, y, state


def _np_params(variables):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                nn.meta.unbox(variables["params"]))


def _ffn(p, e, x, mlp):
  h = x @ p["w_in"][e]
  if mlp == "swiglu":
    g = x @ p["w_gate"][e]
    h = g / (1 + np.exp(-g)) * h
  else:
    h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=True), np.float64)
  return h @ p["w_out"][e]


def manual_moe(variables, x_BLD, mask_BL, cfg: MoeConfig, train: bool, bias=None):
  """Per-token loops, straight from docs/semantics.md. Returns (y [B,L,D], kept-assignment count,
  dropped-assignment count)."""
  p = _np_params(variables)
  b, l, d = x_BLD.shape
  n = b * l
  x = np.asarray(x_BLD, np.float64).reshape(n, d)
  mask = np.ones(n, bool) if mask_BL is None else np.asarray(mask_BL).reshape(n)
  t = n if cfg.group_size is None else min(cfg.group_size, n)
  g = math.ceil(n / t)
  cf = cfg.capacity_factor_for(train)
  c = None if cf is None else min(max(cfg.min_capacity, math.ceil(round(cf * cfg.num_selected * t
                                                                        / cfg.num_experts, 9))), t)
  bias = np.zeros(cfg.num_experts) if bias is None else np.asarray(bias, np.float64)
  y = np.zeros((n, d))
  kept = dropped = 0
  for gi in range(g):
    toks = [i for i in range(gi * t, (gi + 1) * t)]  # indices >= n are tail padding
    logits = np.array([x[i] @ p["router"]["kernel"] if i < n else np.zeros(cfg.num_experts)
                       for i in toks])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    real = [i < n and mask[i] for i in toks]
    if cfg.router == "expert_choice":
      for ex in range(cfg.num_experts):
        cand = sorted([j for j in range(t) if real[j]], key=lambda j: (-probs[j, ex], j))[:c]
        for j in cand:
          y[toks[j]] += probs[j, ex] * _ffn(p["experts"], ex, x[toks[j]], cfg.expert_mlp)
          kept += 1
      continue
    k = cfg.num_selected
    choice = [sorted(range(cfg.num_experts), key=lambda e_: (-(probs[j, e_] + bias[e_]), e_))[:k]
              for j in range(t)]
    order = list(range(t))
    if cfg.priority == "bpr":
      order = sorted(order, key=lambda j: (-probs[j].max(), j))
    counts = [0] * cfg.num_experts
    for kk in range(k):
      for j in order:
        if not real[j]:
          continue
        ex = choice[j][kk]
        if c is not None and counts[ex] >= c:
          dropped += 1
          continue
        counts[ex] += 1
        kept += 1
        w = probs[j, ex]
        if cfg.renormalize:
          w = w / sum(probs[j, e_] for e_ in choice[j])
        y[toks[j]] += w * _ffn(p["experts"], ex, x[toks[j]], cfg.expert_mlp)
  if cfg.num_shared_experts:
    s = p["shared"]
    h = x @ s["w_in"]
    if cfg.expert_mlp == "swiglu":
      gt = x @ s["w_gate"]
      h = gt / (1 + np.exp(-gt)) * h
    else:
      h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=True), np.float64)
    y += h @ s["w_out"]
  return y.reshape(b, l, d), kept, dropped


def _sown(state):
  (moe,) = state["intermediates"]["moe"]
  return moe


# ----------------------------------------------------------------------------------------------
# Output against the manual computation


LAYER_CASES = {
    "top2_drops": dict(capacity_factor=0.6),
    "top1_gelu": dict(num_selected=1, expert_mlp="gelu", capacity_factor=0.8),
    "groups_tail_padding": dict(group_size=5, capacity_factor=0.7),  # 14 tokens = 5+5+4(+1 pad)
    "dropless_auto": dict(capacity_factor=None, dispatch="auto"),
    "gather_strategy": dict(dispatch="gather", capacity_factor=0.6),
    "bpr_no_renorm": dict(priority="bpr", renormalize=False, capacity_factor=0.6),
    "shared_experts": dict(num_shared_experts=2, dispatch="auto"),
    "expert_choice": dict(router="expert_choice", capacity_factor=0.5),
    "one_expert": dict(num_experts=1, num_selected=1, capacity_factor=0.5),
    "k_equals_e": dict(num_selected=E, capacity_factor=0.5),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matches_manual(case, seed):
  cfg = cfg_(**LAYER_CASES[case])
  x, mask = _x(seed), _mask(seed)
  drops = {}
  for train in ((True, False) if case == "top2_drops" else (True,)):
    variables, y, state = _run(cfg, x, mask, train=train, seed=seed)
    want, kept, dropped = manual_moe(variables, x, mask, cfg, train)
    drops[train] = dropped
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)
    m = _sown(state)
    if cfg.router != "expert_choice":
      np.testing.assert_allclose(m["dropped_fraction"], dropped / (kept + dropped), rtol=1e-6)
  if case == "top2_drops":
    assert drops[True] > 0  # the comparison above covered dropped assignments


def test_dropped_assignments_contribute_zero():
  """All tokens to one expert, K=1: only the first C tokens get an output, the rest exactly 0."""
  cfg = cfg_(num_selected=1, capacity_factor=1.0, min_capacity=1, dispatch="auto")
  x = _x(3)
  variables = make_variables(MoeLayer(cfg), x)
  params = nn.meta.unbox(variables["params"])
  # Zero router: all probs equal, top-1 is expert 0 for every token (ties go to the lowest id).
  params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
  _, y, state = _run(cfg, x, variables={"params": params}, train=True)
  c = math.ceil(1.0 * 1 * B * L / E)
  y = np.asarray(y).reshape(B * L, D)
  assert (np.abs(y[:c]).sum(-1) > 0).all()
  assert (y[c:] == 0).all()
  m = _sown(state)
  np.testing.assert_allclose(m["dropped_fraction"], 1 - c / (B * L), rtol=1e-6)
  np.testing.assert_allclose(m["load"], np.eye(E)[0])
  np.testing.assert_allclose(m["max_over_mean_load"], E)


def test_padding_tokens_get_no_routed_output():
  cfg = cfg_(capacity_factor=None, dispatch="auto")
  x, mask = _x(4), _mask(4, p=0.5)
  variables, y, state = _run(cfg, x, mask)
  assert (np.asarray(y)[~mask] == 0).all()
  # Metrics equal those of the real tokens alone.
  real = np.asarray(x)[mask][None]
  _, y2, state2 = _run(cfg, jnp.asarray(real), variables=variables)
  np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y2)[0], rtol=1e-5, atol=1e-6)
  for key, val in _sown(state).items():
    np.testing.assert_allclose(val, _sown(state2)[key], rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------------------------
# Dtypes, jitter, gradients


def _router_logits(layer, variables, x, train=False, rng=None):
  """Jitted apply that also captures the Router's output: (y, sown dict, logits)."""
  fn = jax.jit(lambda v, x, rngs: layer.apply(
      v, x, train=train, rngs=rngs, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: isinstance(mdl, Router)))
  y, st = fn(variables, x, None if rng is None else {"jitter": rng})
  return y, _sown(st), st["intermediates"]["router"]["__call__"][0]


def test_router_runs_in_float32_under_bfloat16():
  cfg = cfg_(dispatch="auto")
  x = _x(5).astype(jnp.bfloat16)
  layer = MoeLayer(cfg, dtype=jnp.bfloat16, causal=False)
  variables = make_variables(layer, x)
  assert variables["params"]["router"]["kernel"].value.dtype == jnp.float32
  y, sown, logits = _router_logits(layer, variables, x)
  assert y.dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
  kernel = np.asarray(nn.meta.unbox(variables["params"])["router"]["kernel"], np.float64)
  want = np.asarray(x, np.float64).reshape(B * L, D) @ kernel
  # float32 accuracy (a bfloat16 router would be off by ~1e-2 relative).
  np.testing.assert_allclose(np.asarray(logits).reshape(B * L, E), want, rtol=1e-5, atol=1e-5)
  for key, val in sown.items():
    assert val.dtype == jnp.float32, key
  # The bfloat16 router ablation really rounds.
  layer16 = MoeLayer(dataclasses.replace(cfg, router_dtype="bfloat16"), dtype=jnp.bfloat16,
                     causal=False)
  _, _, l16 = _router_logits(layer16, variables, x)
  assert l16.dtype == jnp.float32
  assert np.abs(np.asarray(l16, np.float64).reshape(B * L, E) - want).max() > 1e-4


def test_jitter_only_in_training_and_only_on_the_router():
  cfg = cfg_(jitter_eps=0.3, capacity_factor=None, eval_capacity_factor=None, dispatch="auto")
  x = _x(6)
  layer = MoeLayer(cfg, causal=False)
  variables = make_variables(layer, x)
  _, _, clean = _router_logits(layer, variables, x)
  _, _, a = _router_logits(layer, variables, x, True, jax.random.PRNGKey(1))
  _, _, b = _router_logits(layer, variables, x, True, jax.random.PRNGKey(2))
  assert not np.allclose(a, clean) and not np.allclose(a, b)
  kernel = np.asarray(nn.meta.unbox(variables["params"])["router"]["kernel"], np.float64)
  # Jitter multiplies x by U(0.7, 1.3), so each logit moves by at most 0.3 * sum_d |x_d W_de|.
  assert np.abs(np.asarray(a) - np.asarray(clean)).max() <= 0.3 * (
      np.abs(np.asarray(x, np.float64)).reshape(B * L, D) @ np.abs(kernel)).max() + 1e-5
  # Experts see the clean input: with the routing fixed by a huge logit gap, y is unchanged.
  params = nn.meta.unbox(variables["params"])
  kern = np.zeros((D, E), np.float32)
  kern[0, :2] = 100.0  # experts 0 and 1 for tokens with x[..., 0] > 0
  params["router"]["kernel"] = jnp.asarray(kern)
  xp = x.at[..., 0].set(1.0)
  y_eval, _, _ = _router_logits(layer, {"params": params}, xp)
  y_train, _, _ = _router_logits(layer, {"params": params}, xp, True, jax.random.PRNGKey(3))
  np.testing.assert_allclose(np.asarray(y_train), np.asarray(y_eval), rtol=1e-4, atol=1e-6)


def test_gradients_reach_router_and_experts():
  cfg = cfg_(dispatch="auto", num_shared_experts=1)
  x = _x(7)
  layer = MoeLayer(cfg, causal=False)
  variables = make_variables(layer, x)

  def loss(params):
    y, st = layer.apply({"params": params}, x, train=True, mutable=["intermediates"])
    return jnp.sum(y ** 2) + _sown(st)["aux_loss"]

  grads = nn.meta.unbox(jax.jit(jax.grad(loss))(variables["params"]))
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(leaf)).all(), path
    assert np.abs(np.asarray(leaf)).max() > 0, path


# ----------------------------------------------------------------------------------------------
# Sown metrics, balancing bias


def test_sows_documented_keys():
  cfg = cfg_(load_balance_weight=0.1, z_loss_weight=0.01)
  variables, _, state = _run(cfg, _x(8), train=True)
  m = _sown(state)
  assert set(m) == SOWN_KEYS
  assert m["load"].shape == (E,)
  assert m["k_hist"].shape == (cfg.num_selected + 1,)
  for key in SOWN_KEYS - {"load", "k_hist"}:
    assert m[key].shape == (), key
  np.testing.assert_allclose(m["aux_loss"], 0.1 * m["load_balance_loss"] + 0.01 * m["z_loss"],
                             rtol=1e-6)
  np.testing.assert_allclose(np.sum(m["load"]), 1.0, rtol=1e-6)
  assert float(m["bias_norm"]) == 0.0
  assert "moe_bias" not in variables  # only with bias balancing


def test_train_and_eval_capacity_factors():
  cfg = cfg_(capacity_factor=0.4, eval_capacity_factor=None, dispatch="auto")
  x = _x(9)
  variables, _, st_train = _run(cfg, x, train=True)
  _, _, st_eval = _run(cfg, x, train=False, variables=variables)
  assert float(_sown(st_train)["dropped_fraction"]) > 0
  assert float(_sown(st_eval)["dropped_fraction"]) == 0


def test_bias_updates_in_train_not_eval():
  cfg = cfg_(bias_balancing=True, bias_rate=0.01, num_selected=1, capacity_factor=None,
             eval_capacity_factor=None, dispatch="auto")
  x = _x(10)
  layer = MoeLayer(cfg, causal=False)
  variables = jax.jit(functools.partial(layer.init, train=True))(jax.random.PRNGKey(0), x)
  b0 = np.asarray(nn.meta.unbox(variables["moe_bias"])["bias"])
  np.testing.assert_array_equal(b0, np.zeros(E))  # zero at init, even with train=True
  assert variables["moe_bias"]["bias"].names == ("router_expert",)
  mut = ("intermediates", "moe_bias")
  _, _, st = _run(cfg, x, train=True, variables=variables, mutable=mut)
  load = np.asarray(_sown(st)["load"])
  b1 = np.asarray(nn.meta.unbox(st["moe_bias"])["bias"])
  np.testing.assert_allclose(b1, 0.01 * np.sign(load.mean() - load), atol=1e-7)
  assert (b1[load > load.mean()] < 0).all() and (b1[load < load.mean()] > 0).all()
  _, _, st = _run(cfg, x, train=False, variables=variables, mutable=mut)
  np.testing.assert_array_equal(np.asarray(nn.meta.unbox(st["moe_bias"])["bias"]), b0)
  # Not mutable in training: the layer runs and leaves the bias alone.
  _, y, st = _run(cfg, x, train=True, variables=variables)
  assert "moe_bias" not in st
  # The bias steers selection: a large bias on expert 3 takes every token (K=1) ...
  vb = {"params": variables["params"],
        "moe_bias": {"bias": variables["moe_bias"]["bias"].replace_boxed(
            jnp.zeros(E).at[3].set(10.0))}}
  _, y, st = _run(cfg, x, train=False, variables=vb, mutable=mut)
  np.testing.assert_allclose(_sown(st)["load"], np.eye(E)[3])
  np.testing.assert_allclose(_sown(st)["bias_norm"], 10.0)
  # ... but not the combine weights: the output equals the manual computation with that bias.
  want, _, _ = manual_moe(vb, x, None, cfg, False, bias=np.eye(E)[3] * 10)
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Errors: one line, before compilation


@pytest.mark.parametrize("kw,causal,match", [
    (dict(num_selected=0), False, "num_selected"),
    (dict(num_selected=E + 1), False, "num_selected"),
    (dict(capacity_factor=0.0), False, "capacity_factor"),
    (dict(capacity_factor=-1.0), False, "capacity_factor"),
    (dict(router="hash"), False, "router"),
    (dict(dispatch="magic"), False, "dispatch"),
    (dict(priority="bpr"), True, "allow_noncausal_routing"),
    (dict(router="expert_choice"), True, "allow_noncausal_routing"),
])
def test_config_errors(kw, causal, match):
  layer = MoeLayer(cfg_(**kw), causal=causal)
  with pytest.raises(ConfigError, match=match) as info:
    layer.init(jax.random.PRNGKey(0), _x(0))
  assert "\n" not in str(info.value)


def test_noncausal_routing_can_be_forced():
  cfg = cfg_(priority="bpr", allow_noncausal_routing=True)
  _, y, _ = _run(cfg, _x(0), causal=True)
  assert y.shape == (B, L, D)


def test_shape_errors():
  cfg = cfg_()
  layer = MoeLayer(cfg, causal=False)
  variables = make_variables(layer, _x(0))
  with pytest.raises(ValueError, match="model width D") as info:
    layer.apply(variables, _x(0, d=D + 2))
  assert "\n" not in str(info.value)
  with pytest.raises(ValueError, match="padding_mask"):
    layer.apply(variables, _x(0), padding_mask=np.ones((B, L + 1), bool))
  with pytest.raises(ValueError, match=r"\[B, L, D\]"):
    layer.apply(variables, _x(0)[0])
