"""Sparse upcycling: expert copies, fresh router, exact equality with the dense parent at step 0
(dropless, renormalized top-K), noise, scanned stacks, one-line errors, and through the trainer."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe.train import upcycle
from moe.errors import ConfigError
from moe.model.config import ModelConfig
from moe.layer.config import MoeConfig
from moe.model.transformer import Transformer, param_shapes

V = 41


def dense_cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=V, d_model=16, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=8,
              d_ff=12, max_len=16)
  base.update(kw)
  return ModelConfig(**base)


def moe_cfg(dense: ModelConfig, first_moe_layer=0, **moe_kw) -> ModelConfig:
  m = dict(num_experts=4, num_selected=2, expert_hidden=dense.d_ff, capacity_factor=None,
           eval_capacity_factor=None, renormalize=True)
  m.update(moe_kw)
  return dataclasses.replace(dense, moe=MoeConfig(**m), first_moe_layer=first_moe_layer)


def run_cfg(noise=0.0, seed=0, expert_hidden=12):
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict({"upcycle_noise": noise, "seed": seed})
  c.moe = ml_collections.ConfigDict({"num_experts": 4, "expert_hidden": expert_hidden})
  return c


def tokens(seed=0, b=3, l=13):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, l)), jnp.int32)


def dense_params(cfg, seed=1):
  return Transformer(cfg).init(jax.random.key(seed), tokens())["params"]


def logits(cfg, params, toks):
  return Transformer(cfg).apply({"params": params}, toks)


def test_upcycled_model_equals_dense_parent():
  d = dense_cfg()
  m = moe_cfg(d, first_moe_layer=1)  # block 0 stays dense
  dp = nn.unbox(dense_params(d))
  up = upcycle.upcycle_params(jax.device_get(dp), param_shapes(m), run_cfg())
  # Structure and shapes exactly those of the MoE model.
  assert jax.tree.structure(up) == jax.tree.structure(param_shapes(m))
  for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(param_shapes(m))):
    assert a.shape == b.shape and a.dtype == np.float32
  # Experts are copies of the block's dense FFN; other params copied bit for bit.
  for i in (1, 2):
    for w in ("w_in", "w_gate", "w_out"):
      got = up[f"block_{i}"]["moe"]["experts"][w]
      for e in range(4):
        np.testing.assert_array_equal(got[e], np.asarray(dp[f"block_{i}"]["mlp"][w]))
  np.testing.assert_array_equal(up["block_0"]["mlp"]["w_in"], dp["block_0"]["mlp"]["w_in"])
  np.testing.assert_array_equal(up["embedding_table"], dp["embedding_table"])
  np.testing.assert_array_equal(up["block_2"]["attn"]["q_kernel"], dp["block_2"]["attn"]["q_kernel"])
  # The router is fresh (not zero, differs between layers).
  r1, r2 = up["block_1"]["moe"]["router"]["kernel"], up["block_2"]["moe"]["router"]["kernel"]
  assert np.std(r1) > 0.05 and not np.allclose(r1, r2)

  toks = tokens(3)
  ref = logits(d, dp, toks)
  got = logits(m, up, toks)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_equality_needs_renormalized_weights():
  """The exactness above is not vacuous: without renormalization the K weights sum to < 1."""
  d = dense_cfg()
  m = moe_cfg(d, renormalize=False)
  dp = jax.device_get(nn.unbox(dense_params(d)))
  up = upcycle.upcycle_params(dp, param_shapes(m), run_cfg())
  toks = tokens(4)
  assert np.max(np.abs(logits(m, up, toks) - logits(d, dp, toks))) > 1e-3


def test_router_from_init_params_and_noise():
  d = dense_cfg(num_layers=2)
  m = moe_cfg(d)
  dp = jax.device_get(nn.unbox(dense_params(d)))
  init = jax.device_get(nn.unbox(Transformer(m).init(jax.random.key(7), tokens())["params"]))
  up = upcycle.upcycle_params(dp, param_shapes(m), run_cfg(), init_params=init)
  np.testing.assert_array_equal(up["block_0"]["moe"]["router"]["kernel"],
                                init["block_0"]["moe"]["router"]["kernel"])
  noisy = upcycle.upcycle_params(dp, param_shapes(m), run_cfg(noise=0.1))
  again = upcycle.upcycle_params(dp, param_shapes(m), run_cfg(noise=0.1))
  w = noisy["block_0"]["moe"]["experts"]["w_in"]
  np.testing.assert_array_equal(w, again["block_0"]["moe"]["experts"]["w_in"])  # fixed key
  assert not np.allclose(w[0], w[1])  # experts differ
  rel = np.abs(w - dp["block_0"]["mlp"]["w_in"][None]) / np.abs(dp["block_0"]["mlp"]["w_in"][None])
  assert 0.05 < np.median(rel) / 0.1 < 1.5  # relative noise of the requested size


def test_scanned_stack():
  d = dense_cfg(scan_layers=True)
  m = moe_cfg(d)
  dp = jax.device_get(nn.unbox(dense_params(d)))
  up = upcycle.upcycle_params(dp, param_shapes(m), run_cfg())
  w = up["blocks"]["moe"]["experts"]["w_out"]
  assert w.shape == (3, 4, 12, 16)
  np.testing.assert_array_equal(w[:, 2], dp["blocks"]["mlp"]["w_out"])
  toks = tokens(5)
  np.testing.assert_allclose(logits(m, up, toks), logits(d, dp, toks), rtol=1e-5, atol=1e-5)


def test_fresh_router_has_the_layer_variance_in_a_scanned_stack():
  # The layer axis of a scanned [layers, D, E] stack is not fan-in: each layer's slice gets the
  # variance an unscanned router gets (1/D), not 1/(layers*D).
  layers_, d_model, e = 8, 64, 16
  w = upcycle.fresh_init((layers_, d_model, e), jax.random.key(0))
  one = upcycle.fresh_init((d_model, e), jax.random.key(0))
  assert w.shape == (layers_, d_model, e)
  assert abs(float(np.std(w)) * np.sqrt(d_model) - 1.0) < 0.05
  assert abs(float(np.std(w)) / float(np.std(one)) - 1.0) < 0.15
  assert not np.array_equal(w[0], w[1])


def test_shape_errors_are_one_line():
  d = dense_cfg()
  dp = jax.device_get(nn.unbox(dense_params(d)))
  wrong = moe_cfg(d, expert_hidden=8)
  with pytest.raises(ConfigError, match=r"mlp/w_\w+ has shape \(16, 12\).*d_ff must equal moe.expert_hidden") as e:
    upcycle.upcycle_params(dp, param_shapes(wrong), run_cfg(expert_hidden=8))
  assert "\n" not in str(e.value)
  other = moe_cfg(dense_cfg(d_model=24, head_dim=12))
  with pytest.raises(ConfigError, match=r"k_kernel has shape \(16, 2, 8\) in the dense checkpoint but \(24, 2, 12\)"):
    upcycle.upcycle_params(dp, param_shapes(other), run_cfg())
  fewer = moe_cfg(dense_cfg(num_layers=2))
  with pytest.raises(ConfigError, match="block_2.*no place"):
    upcycle.upcycle_params(dp, param_shapes(fewer), run_cfg())
  with pytest.raises(ConfigError, match="already holds MoE"):
    mp = jax.device_get(nn.unbox(Transformer(moe_cfg(d)).init(jax.random.key(0), tokens())["params"]))
    upcycle.upcycle_params(mp, param_shapes(moe_cfg(d)), run_cfg())
  gpt = dense_cfg(attention_bias=True, mlp_activation="gelu")
  gp = jax.device_get(nn.unbox(dense_params(gpt)))
  with pytest.raises(ConfigError, match="biases"):
    upcycle.upcycle_params(gp, param_shapes(moe_cfg(gpt, expert_mlp="gelu")), run_cfg())


@pytest.mark.slow
def test_upcycle_through_trainer(tiny_config, tmp_path):
  """Dense parent trained, then `train.init_from` + `train.upcycle`: the MoE run's eval after one
  near-zero-lr step equals the parent's eval (the routed copies compute the dense FFN)."""
  from moe.train import trainer as train
  common = {"model.d_ff": 16, "moe.expert_hidden": 16, "moe.capacity_factor": None,
            "moe.eval_capacity_factor": None, "train.log_every": 1}
  parent = str(tmp_path / "dense")
  dense = tiny_config({**common, "moe.enabled": False, "train.steps": 3})
  s_dense = train.train_and_evaluate(dense, parent)
  assert s_dense["status"] == "completed"
  # Evaluate the parent once more (same eval batches as the child's).
  child = str(tmp_path / "upcycled")
  moe = tiny_config({**common, "train.steps": 1, "train.init_from": parent,
                     "train.upcycle": True, "train.learning_rate": 1e-12,
                     "train.weight_decay": 0.0})
  s_moe = train.train_and_evaluate(moe, child)
  assert s_moe["status"] == "completed"
  ce_parent = train.evaluate(dense, parent)["eval_cross_entropy"]
  assert s_moe["eval_cross_entropy"] == pytest.approx(ce_parent, rel=1e-5)
  first = json.loads(open(os.path.join(child, "metrics.jsonl")).readline())
  assert first["step"] == 1 and np.isfinite(first["cross_entropy"])
