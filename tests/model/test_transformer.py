"""The Transformer LM: shapes, causality and packing, scan/remat, bf16, MoE plumbing, parameter
counts, logical axis names, sharded execution and input errors (attention details and the KV
cache: test_attention.py)."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.errors import ConfigError
from moe.model.config import ModelConfig
from moe.model.transformer import Transformer, active_params, count_params, init_cache
from moe.sharding import LOGICAL_RULES
from conftest import REPO, TESTS
from tiny_models import (B, DENSE_VARIANTS, L, V, abstract_vars, dropless_moe, fwd, init,
                         real_init, run, stack_blocks, tiny, tokens)

# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, parameter tree


def test_init_with_real_initializers():
  cfg = tiny(**DENSE_VARIANTS["gpt2_style"])
  v = real_init(cfg)
  p = nn.unbox(v["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  np.testing.assert_array_equal(p["final_norm"]["scale"], 1.0)
  assert 0.1 < float(jnp.std(p["block_0"]["attn"]["q_kernel"])) * math.sqrt(cfg.d_model) < 2
  logits = fwd(cfg, v, tokens(1))
  assert np.isfinite(np.asarray(logits)).all()
  # Initial logits are small: the loss starts near log(V).
  assert float(jnp.std(logits)) < 2.0


@pytest.mark.parametrize("variant", sorted(DENSE_VARIANTS))
def test_shapes_and_dtype(variant):
  cfg = tiny(**DENSE_VARIANTS[variant])
  v = init(cfg)
  logits = fwd(cfg, v, tokens(1))
  assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # The real initializers make float32 params (init() above draws its own values).
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_vars(cfg)["params"]))
  if cfg.logits_soft_cap:
    assert np.abs(np.asarray(logits)).max() < cfg.logits_soft_cap


def dense_param_count(cfg: ModelConfig) -> int:
  D, H, N, K, F, Vv = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  bias = cfg.attention_bias
  attn = D * H * K + 2 * D * N * K + H * K * D + (H * K + 2 * N * K + D if bias else 0)
  n_mlp = 3 if cfg.mlp_activation == "swiglu" else 2
  mlp = n_mlp * D * F + ((n_mlp - 1) * F + D if bias else 0)
  norm = D * (2 if cfg.norm == "layer" else 1)
  per_block = attn + mlp + 2 * norm
  emb = Vv * D * (1 if cfg.tie_embeddings else 2)
  pos = cfg.max_len * D if cfg.positions == "learned" else 0
  return emb + pos + cfg.num_layers * per_block + norm


@pytest.mark.parametrize("variant", ["default", "gpt2_style"])
def test_param_count_matches_formula(variant):
  cfg = tiny(**DENSE_VARIANTS[variant])
  n = count_params(abstract_vars(cfg)["params"])
  assert n == dense_param_count(cfg)
  assert active_params(cfg) == n


# ----------------------------------------------------------------------------------------------
# Causality and packing (whole model, dense and MoE)


def model_configs_for_masks():
  out = [pytest.param(tiny(), id="dense"),
         pytest.param(tiny(positions="learned", norm="layer"), id="dense_learned")]
  out.append(pytest.param(tiny(moe=dropless_moe()), id="moe"))
  out.append(pytest.param(tiny(num_layers=3, moe=dropless_moe(), moe_interval=2,
                               first_moe_layer=1), id="moe_interleaved",
                          marks=pytest.mark.slow))
  return out


@pytest.mark.parametrize("cfg", model_configs_for_masks())
def test_causality(cfg):
  v = init(cfg)
  toks = tokens(5)
  base = np.asarray(fwd(cfg, v, toks))
  for t in (0, 4, L - 2):
    changed = toks.at[:, t + 1:].set((toks[:, t + 1:] + 1) % V)
    out = np.asarray(fwd(cfg, v, changed))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=1e-6)
    assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-4  # the change is visible


@pytest.mark.parametrize("cfg", model_configs_for_masks())
def test_packing_matches_separate_sequences(cfg):
  v = init(cfg)
  a, b = tokens(6, 1, 4), tokens(7, 1, 5)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 4 + [2] * 5 + [0] * 2])
  pos = jnp.asarray([list(range(4)) + list(range(5)) + [0, 0]])
  out = np.asarray(fwd(cfg, v, packed, positions=pos, segment_ids=seg))
  alone_a = np.asarray(fwd(cfg, v, a))
  alone_b = np.asarray(fwd(cfg, v, b))
  np.testing.assert_allclose(out[:, :4], alone_a, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 4:9], alone_b, atol=2e-5, rtol=1e-5)
  # Segment 1 is unaffected by anything in segment 2 or the padding.
  other = packed.at[:, 4:].set((packed[:, 4:] + 3) % V)
  out2 = np.asarray(fwd(cfg, v, other, positions=pos, segment_ids=seg))
  np.testing.assert_allclose(out2[:, :4], out[:, :4], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# scan / remat



def scan_configs():
  out = [tiny(), tiny(norm="layer", positions="learned", attention_bias=True, mlp_activation="gelu")]
  out.append(tiny(moe=dropless_moe()))
  return out


@pytest.mark.parametrize("cfg", scan_configs())
def test_scan_and_remat_match_unscanned(cfg):
  v = init(cfg)
  p = nn.unbox(v["params"])
  rest = {k: x for k, x in v.items() if k != "params"}
  toks = tokens(10)
  ref = np.asarray(fwd(cfg, v, toks))
  for scan, remat in ((True, False), (False, True), (True, True)):
    c = dataclasses.replace(cfg, scan_layers=scan, remat=remat)
    pp = stack_blocks(p, cfg.num_layers) if scan else p
    rr = {k: stack_blocks(nn.unbox(x), cfg.num_layers) if scan else x for k, x in rest.items()}
    # The scanned init produces exactly this tree structure and these shapes.
    got = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_vars(c)["params"]))
    assert got == jax.tree.map(lambda x: x.shape, pp)
    np.testing.assert_allclose(np.asarray(fwd(c, {"params": pp, **rr}, toks)), ref,
                               atol=1e-5, rtol=1e-5)


def test_scan_remat_gradients_match():
  # remat changes only what is stored for the backward pass, scan only the layout.
  cfg = tiny()
  p = nn.unbox(init(cfg)["params"])
  toks = tokens(10)
  loss = lambda c: jax.jit(jax.grad(lambda q: Transformer(c).apply({"params": q}, toks).sum()))
  g_ref = stack_blocks(loss(cfg)(p), cfg.num_layers)
  c = dataclasses.replace(cfg, scan_layers=True, remat=True)
  g = loss(c)(stack_blocks(p, cfg.num_layers))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_ref)


def test_scan_refuses_mixed_blocks():
  cfg = tiny(num_layers=3, moe=dropless_moe(), moe_interval=2, scan_layers=True)
  with pytest.raises(ConfigError, match="model.scan_layers"):
    init(cfg)


# ----------------------------------------------------------------------------------------------
# bfloat16 compute


def test_bf16_compute_close_to_f32():
  cfg32 = tiny()
  cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
  v = init(cfg16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(abstract_vars(cfg16))))
  toks = tokens(11)
  out16 = fwd(cfg16, v, toks)
  out32 = fwd(cfg32, v, toks)
  assert out16.dtype == jnp.float32
  err = np.abs(np.asarray(out16) - np.asarray(out32)).max()
  assert 0 < err < 0.1 * np.abs(np.asarray(out32)).max()  # bf16 really ran, and stayed close
  jaxpr = str(jax.make_jaxpr(lambda t: fwd(cfg16, v, t))(toks))
  assert "bf16" in jaxpr


def test_bf16_moe_runs_with_f32_params_and_router():
  cfg = tiny(moe=dropless_moe(), dtype="bfloat16")
  v = init(cfg)
  p = nn.unbox(abstract_vars(cfg)["params"])  # dtypes the real initializers give
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  assert p["block_0"]["moe"]["router"]["kernel"].dtype == jnp.float32
  logits, st = run(cfg, v, tokens(12), capture_intermediates=True, mutable=("intermediates",))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  moe = st["intermediates"]["block_0"]["moe"]
  assert moe["moe"][0]["load"].dtype == jnp.float32
  # The experts ran in bf16, the router in float32 (spec: whatever the model dtype).
  assert moe["router"]["__call__"][0].dtype == jnp.float32
  assert moe["experts"]["__call__"][0].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# MoE plumbing: intermediates, moe_bias, active parameters


def test_moe_layers_placed_and_intermediates_pass_through():
  cfg = tiny(num_layers=4, moe=dropless_moe(), moe_interval=2, first_moe_layer=1)
  v = init(cfg)
  p = v["params"]
  kinds = ["moe" if "moe" in p[f"block_{i}"] else "mlp" for i in range(4)]
  assert kinds == ["mlp", "moe", "mlp", "moe"]
  _, state = run(cfg, v, tokens(13), mutable=("intermediates",))
  inter = state["intermediates"]
  assert sorted(inter) == ["block_1", "block_3"]
  for name in ("block_1", "block_3"):
    d = inter[name]["moe"]["moe"][0]
    assert d["load"].shape == (cfg.moe.num_experts,)
    np.testing.assert_allclose(float(d["load"].sum()), 1.0, atol=1e-5)
    assert np.isfinite(float(d["aux_loss"]))
  # Scanned (and rematerialized) model: one stacked dict, leading layer axis.
  cs = tiny(moe=dropless_moe(), scan_layers=True, remat=True)
  vs = init(cs)
  _, st = run(cs, vs, tokens(13), mutable=("intermediates",))
  assert st["intermediates"]["blocks"]["moe"]["moe"][0]["load"].shape == (2, cs.moe.num_experts)


def test_moe_bias_collection_is_updated_in_training():
  cfg = tiny(moe=dropless_moe(bias_balancing=True, bias_rate=0.5))
  v = init(cfg)
  assert "moe_bias" in v
  b0 = nn.unbox(v["moe_bias"])["block_0"]["moe"]["bias"]
  assert b0.shape == (cfg.moe.num_experts,)
  _, state = run(cfg, v, tokens(14), train=True, mutable=("moe_bias",))
  b1 = nn.unbox(state["moe_bias"])["block_0"]["moe"]["bias"]
  assert np.abs(np.asarray(b1) - np.asarray(b0)).max() > 0
  cs = dataclasses.replace(cfg, scan_layers=True, moe=dataclasses.replace(cfg.moe, jitter_eps=0.1))
  boxed = abstract_vars(cs)["moe_bias"]["blocks"]["moe"]["bias"]
  assert boxed.names == ("layers", "router_expert")
  assert boxed.value.shape == (2, cfg.moe.num_experts)
  # Scanned, training, with router jitter (rng stream split per layer): both layers' biases move.
  vs = init(cs)
  _, st = run(cs, vs, tokens(14), rngs={"jitter": jax.random.key(1)}, train=True,
              mutable=("moe_bias",))
  moved = np.abs(np.asarray(st["moe_bias"]["blocks"]["moe"]["bias"])).max(axis=1)
  assert (moved > 0).all()


@pytest.mark.parametrize("shared", [0, 1])
def test_active_params(shared):
  cfg = tiny(num_layers=3, moe=dropless_moe(num_shared_experts=shared), moe_interval=2)
  p = nn.unbox(abstract_vars(cfg)["params"])
  total = count_params(p)
  E, K = cfg.moe.num_experts, cfg.moe.num_selected
  experts = sum(count_params(p[f"block_{i}"]["moe"]["experts"]) for i in (0, 2))
  assert active_params(cfg) == total - experts * (E - K) // E
  # A dense model with d_ff = K*F (+ shared*F) in those blocks has about the same active count
  # (the MoE adds only its router).
  router = sum(count_params(p[f"block_{i}"]["moe"]["router"]) for i in (0, 2))
  dense = dataclasses.replace(cfg, moe=None)
  dense_ffn = 3 * cfg.d_model * cfg.moe.expert_hidden * (K + shared)
  mlp = 3 * cfg.d_model * cfg.d_ff
  assert active_params(cfg) == active_params(dense) + 2 * (dense_ffn - mlp) + router
  # adaptive k: the planned k (the target mean k under the controller, k_max under top_p)
  target = dataclasses.replace(cfg, moe=dataclasses.replace(
      cfg.moe, k_rule="top_p_target", target_k=1.5))
  assert active_params(target) == total - round(experts * (E - 1.5) / E)
  top_p = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, k_rule="top_p"))
  assert active_params(top_p) == active_params(cfg)


# ----------------------------------------------------------------------------------------------
# Logical axis names, input errors


def logical_configs():
  out = [tiny(), tiny(scan_layers=True),
         tiny(norm="layer", positions="learned", attention_bias=True, mlp_activation="gelu")]
  out += [tiny(moe=dropless_moe(num_shared_experts=1), moe_interval=2),
          tiny(moe=dropless_moe(), scan_layers=True)]
  return out


@pytest.mark.parametrize("cfg", logical_configs())
def test_every_param_has_logical_axis_names(cfg):
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens()))["params"]
  known = {name for name, _ in LOGICAL_RULES}
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
    names = leaf.names
    assert len(names) == leaf.value.ndim, where
    assert any(n is not None for n in names), where
    assert set(n for n in names if n is not None) <= known, (where, names)
    if cfg.scan_layers and "blocks" in where:
      assert names[0] == "layers", where
    assert nn.logical_to_mesh_axes(names, LOGICAL_RULES) is not None


def test_too_long_input_errors_before_compiling():
  cfg = tiny(max_len=8)
  model = Transformer(cfg)
  long = jax.ShapeDtypeStruct((1, 9), jnp.int32)
  # eval_shape only traces; the error comes from the Python check, not from XLA.
  with pytest.raises(ConfigError, match=r"model\.max_len"):
    jax.eval_shape(lambda t: model.init(jax.random.key(0), t), long)
  v = init(cfg, tokens(l=8))
  with pytest.raises(ConfigError, match=r"model\.max_len"):
    jax.eval_shape(lambda t: model.apply(v, t), long)
  with pytest.raises(ConfigError, match="max_len"):
    init_cache(model, 1, max_len=9)


def test_bad_config_is_one_line_error():
  with pytest.raises(ConfigError, match="model.num_kv_heads") as e:
    init(tiny(num_kv_heads=3))
  assert "\n" not in str(e.value)


SHARDED_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path[:0] = [{repo!r}, {tests!r}]
import jax, numpy as np, flax.linen as nn, ml_collections
from tiny_models import tiny, dropless_moe, init, fwd, tokens, abstract_vars
from moe.model.transformer import Transformer
from moe.sharding import make_mesh, LOGICAL_RULES
mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, expert=2, tensor=2)))
mla = dict(attention="mla", q_lora_rank=6, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
           v_head_dim=6, rope_interleave=True)
for cfg in [tiny(vocab_size=40), tiny(vocab_size=40, moe=dropless_moe(), scan_layers=True),
            tiny(vocab_size=40, moe=dropless_moe(score_func="sigmoid"), first_moe_layer=1, **mla)]:
  v = init(cfg)
  toks = tokens(l=8, b=4)
  ref = np.asarray(fwd(cfg, v, toks))
  specs = nn.get_partition_spec(abstract_vars(cfg, toks))
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    sh = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
    vs = jax.device_put(v, sh)
    f = jax.jit(lambda v, t: Transformer(cfg).apply(v, t))
    out = f(vs, toks)
    n_constraints = f.lower(vs, toks).as_text().count("sharding_constraint")
  assert n_constraints > 0, "no logical constraint took effect"
  assert len(out.sharding.device_set) == 8
  err = float(np.abs(np.asarray(out) - ref).max())
  assert err < 1e-5, err
  print("ok", err, n_constraints)
"""


@pytest.mark.slow
def test_sharded_forward_matches_single_device():
  """Params placed by their logical names on a data x expert x tensor mesh of 8 CPU devices
  (a fresh process, so the device count can be forced) give the single-device logits (MLA
  included)."""
  import subprocess
  import sys
  code = SHARDED_SCRIPT.format(repo=REPO, tests=TESTS)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("ok") == 3
