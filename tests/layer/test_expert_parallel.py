"""Expert parallelism on 8 simulated CPU devices: the sharded MoE layer and the trainer equal the
one-device run (same routing groups), and the compiled HLO moves tokens with all-to-all and never
gathers all experts' weights.

The pytest process has one CPU device, and XLA fixes the device count when the backend starts,
so every 8-device check runs in a fresh interpreter (`on_8_devices`), which sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, imports this file and calls one `case_*`
function. One-device references run either there (a plain call, no mesh) or in this process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TESTS  # noqa: E402
from experiments import hlo as hlo_lib  # namespace package: conftest puts REPO on sys.path
MESHES = [(8, 1, 1, 1), (2, 1, 4, 1), (1, 2, 4, 1), (2, 1, 2, 2), (1, 1, 8, 1)]


def on_8_devices(case: str, *args, timeout=900) -> str:
  """Runs `case(*args)` of this module in a fresh 8-CPU-device interpreter; returns its stdout."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  here = os.path.dirname(os.path.abspath(__file__))  # this module's folder, tests/layer
  code = (f"import sys; sys.path[:0] = [{REPO!r}, {TESTS!r}, {here!r}]\n"
          f"import test_expert_parallel as t\n"
          f"t.{case}(*{list(args)!r})\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     timeout=timeout, env=env, cwd=REPO)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-5000:])
  return r.stdout


def mesh_of(shape):
  import ml_collections
  from moe import sharding
  return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))))


def place(mesh, variables):
  """Boxed Flax variables -> unboxed arrays placed by their logical names."""
  import flax.linen as nn
  import jax
  from moe import sharding
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh,
                                          sharding.LOGICAL_RULES)
  return jax.device_put(nn.unbox(variables), shardings)


def _run_on_mesh(fn, variables, x, shape):
  """fn(params, moe_bias, x) with the variables and x placed on a mesh of `shape`, on host."""
  import jax
  from moe import sharding
  mesh = mesh_of(shape)
  placed = place(mesh, variables)
  xs = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed")))
  with sharding.activate(mesh):
    return jax.device_get(fn(*split(placed), xs))


# ----------------------------------------------------------------------------- the layer


def _layer_problem(moe_kwargs, b=8, l=6, d=12, seed=0):
  """A MoeLayer, its variables and a loss whose value, gradients, sown stats and bias update
  are all compared: (layer, variables, fn(params, bias, x) -> (loss, stats, bias), grads)."""
  import jax
  import jax.numpy as jnp
  from moe.layer.config import MoeConfig
  from moe.layer.modules import MoeLayer
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  mask = jnp.asarray(rng.random((b, l)) > 0.15)
  layer = MoeLayer(MoeConfig(**moe_kwargs))
  variables = layer.init({"params": jax.random.key(seed), "jitter": jax.random.key(1)}, x,
                         padding_mask=mask, train=True)

  def loss(params, bias, x):
    y, mut = layer.apply({"params": params, "moe_bias": bias}, x, padding_mask=mask, train=True,
                         rngs={"jitter": jax.random.key(2)},
                         mutable=["intermediates", "moe_bias"])
    stats = mut["intermediates"]["moe"][0]
    return jnp.sum(jnp.sin(y) * y) + stats["aux_loss"], (stats, mut.get("moe_bias", {}))

  return x, variables, jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


def _max_rel_err(a_tree, b_tree):
  import jax
  errs = []
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    errs.append(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-6)))
  return max(errs)


LAYER_CASES = {
    # capacity with drops (C = ceil(1.0 * 2 * 6 / 8) = 2 of T = 6), bias balancing, jitter
    "capacity": (dict(num_experts=8, num_selected=2, expert_hidden=16, capacity_factor=1.0,
                      min_capacity=1, group_size=6, bias_balancing=True, bias_rate=0.1,
                      jitter_eps=0.1),
                 [(2, 1, 4, 1), (1, 2, 4, 1), (2, 1, 2, 2), (1, 1, 2, 4)]),
    "dropless": (dict(num_experts=8, num_selected=2, expert_hidden=16, capacity_factor=None,
                      group_size=3, expert_mlp="gelu"),
                 [(1, 1, 8, 1), (2, 1, 2, 2)]),
    "expert_choice": (dict(num_experts=4, num_selected=2, expert_hidden=16, capacity_factor=1.0,
                           min_capacity=1, router="expert_choice", allow_noncausal_routing=True, group_size=6,
                           num_shared_experts=1),
                      [(2, 1, 4, 1)]),
    # DeepSeek-V3 / Qwen2-MoE routing: sigmoid scores + correction bias, 4 groups keep 2,
    # routed scale, gated shared expert of its own width; with drops and dropless
    "deepseek": (dict(num_experts=8, num_selected=2, expert_hidden=16, capacity_factor=1.0,
                      min_capacity=1, group_size=6, score_func="sigmoid", routed_scale=2.5,
                      num_groups=4, groups_selected=2, group_score="top2_sum",
                      bias_balancing=True, bias_rate=0.1, num_shared_experts=1,
                      shared_expert_hidden=12, shared_expert_gate=True),
                 [(2, 1, 4, 1)]),
    "deepseek_dropless": (dict(num_experts=8, num_selected=3, expert_hidden=16,
                               capacity_factor=None, group_size=3, score_func="sigmoid",
                               num_groups=4, groups_selected=2, group_score="max",
                               renormalize=False),
                          [(1, 1, 8, 1)]),
}


def case_layer_matches_one_device():
  """Forward, gradients (params and input), every sown statistic and the bias update of the
  sharded layer equal the one-device layer with the same group size. `group_size=None` on the
  mesh means one group per device, i.e. the one-device run with group_size = B*L/shards."""
  import jax
  from moe.layer import expert_parallel
  from moe import sharding
  calls = []
  real = expert_parallel.ExpertParallel.apply_experts
  expert_parallel.ExpertParallel.apply_experts = (
      lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
  for name, (kwargs, meshes) in LAYER_CASES.items():
    x, variables, fn = _layer_problem(kwargs)
    plain = jax.device_get(fn(*split(variables), x))
    assert not calls, "the one-device run must not take the expert-parallel path"
    for shape in meshes:
      out = _run_on_mesh(fn, variables, x, shape)
      assert calls, "the mesh run did not take the expert-parallel path"
      calls.clear()
      err = _max_rel_err(plain, out)
      stats = plain[0][1][0]
      print(f"layer {name} {shape} rel_err={err:.2e} "
            f"dropped={float(stats['dropped_fraction']):.3f}")
      assert err < 2e-5, (name, shape, err)
    if name == "capacity":
      assert float(plain[0][1][0]["dropped_fraction"]) > 0.05  # drops really happen
  # group_size=None: one group per device == one device with group_size = tokens per device.
  kwargs = dict(LAYER_CASES["capacity"][0], group_size=None)
  x, variables, fn_mesh = _layer_problem(kwargs)
  _, _, fn_ref = _layer_problem(dict(kwargs, group_size=8 * 6 // 4))
  ref = jax.device_get(fn_ref(*split(variables), x))
  mesh = mesh_of((2, 1, 2, 2))  # 4 batch shards of 2 rows x 6 = 12 tokens
  placed = place(mesh, variables)
  with sharding.activate(mesh):
    out = fn_mesh(*split(placed), x)
  err = _max_rel_err(ref, jax.device_get(out))
  print(f"layer group_size=None (2,1,2,2) rel_err={err:.2e}")
  assert err < 2e-5, err
  # A group size that does not divide the tokens of a device: one-line ConfigError.
  from moe.errors import ConfigError
  _, variables, fn_bad = _layer_problem(dict(kwargs, group_size=5))
  params, bias = split(variables)
  try:
    with sharding.activate(mesh):
      fn_bad(params, bias, x)
  except ConfigError as e:
    assert "moe.group_size (5)" in str(e) and "12 tokens" in str(e) and "\n" not in str(e)
    print("group error ok")
  else:
    raise AssertionError("group_size=5 on 12 tokens per device was accepted")
  print("ok")


ADAPTIVE_CASES = {
    # top-p with the threshold controller, capacity C = ceil(1.0 * target_k * 6 / 8) = 2, bias
    "adaptive_target": (dict(num_experts=8, num_selected=3, expert_hidden=16,
                             capacity_factor=1.0, min_capacity=1, group_size=6,
                             k_rule="top_p_target", top_p=0.4, target_k=2.0, top_p_rate=0.05,
                             bias_balancing=True, bias_rate=0.1, router_entropy_weight=0.01,
                             router_logit_scale=3.0),
                        [(2, 1, 4, 1)]),
    "adaptive_dropless": (dict(num_experts=8, num_selected=3, expert_hidden=16,
                               capacity_factor=None, group_size=3, k_rule="top_p", top_p=0.5,
                               router_logit_scale=3.0),
                          [(1, 1, 8, 1), (2, 1, 2, 2)]),
}


def case_adaptive_layer_matches_one_device():
  """Adaptive k on a mesh: output, gradients, every sown statistic (mean k, k histogram) and the
  threshold (and bias) update equal one device: the controller sees the global mean k."""
  import jax
  for name, (kwargs, meshes) in ADAPTIVE_CASES.items():
    x, variables, fn = _layer_problem(kwargs)
    plain = jax.device_get(fn(*split(variables), x))
    stats, state = plain[0][1]
    mean_k = float(stats["mean_k"])
    assert 1.0 < mean_k < 3.0 and float(stats["k_hist"][1]) > 0, (name, mean_k)
    if "top_p" in state:
      assert float(state["top_p"]) != kwargs["top_p"]  # the controller moved it
    for shape in meshes:
      err = _max_rel_err(plain, _run_on_mesh(fn, variables, x, shape))
      print(f"adaptive {name} {shape} rel_err={err:.2e} mean_k={mean_k:.3f}")
      assert err < 2e-5, (name, shape, err)
  print("ok")


@pytest.mark.slow
def test_adaptive_layer_matches_one_device():
  out = on_8_devices("case_adaptive_layer_matches_one_device")
  assert out.strip().endswith("ok"), out
  assert out.count("adaptive ") == sum(len(m) for _, m in ADAPTIVE_CASES.values())


def split(variables):
  """(params, moe_bias) of boxed or placed variables (moe_bias {} without bias balancing)."""
  import flax.linen as nn
  variables = nn.unbox(variables)
  return variables["params"], variables.get("moe_bias", {})


@pytest.mark.slow
def test_layer_matches_one_device():
  out = on_8_devices("case_layer_matches_one_device")
  assert out.strip().endswith("ok"), out
  assert out.count("layer ") == 1 + sum(len(m) for _, m in LAYER_CASES.values())


# ----------------------------------------------------------------------------- HLO evidence


def _expert_weight_gathers(hlo: str, num_experts: int) -> list:
  """All-gathers whose result is a 3-D array with all E experts on its leading axis."""
  return [c for c in hlo_lib.hlo_collectives(hlo) if c["op"] == "all-gather"
          and any(len(s) == 3 and s[0] == num_experts for _, s in c["shapes"])]


def case_hlo_layer():
  """The MoE layer's forward + backward compiled on expert-parallel meshes."""
  import jax
  import jax.numpy as jnp
  from moe import sharding
  E, D, F = 8, 12, 16
  kwargs = dict(num_experts=E, num_selected=2, expert_hidden=F, capacity_factor=1.25,
                min_capacity=1, group_size=6)
  for dropless in (False, True):
    x, variables, _ = _layer_problem(dict(kwargs, capacity_factor=None if dropless else 1.25),
                                     d=D)
    from moe.layer.config import MoeConfig
    from moe.layer.modules import MoeLayer
    layer = MoeLayer(MoeConfig(**dict(kwargs, capacity_factor=None if dropless else 1.25)))

    def loss(params, x):
      y = layer.apply({"params": params}, x, train=True, mutable=["intermediates"])[0]
      return jnp.sum(y * y)

    for shape in [(2, 1, 4, 1), (1, 2, 2, 2)]:
      mesh = mesh_of(shape)
      X, fsdp, tp = shape[2], shape[1], shape[3]
      params = place(mesh, variables)["params"]
      w_in = params["experts"]["w_in"]
      # Each device holds E/X experts, D/fsdp rows and F/tensor columns of them.
      assert {s.data.shape for s in w_in.addressable_shards} == {(E // X, D // fsdp, F // tp)}
      xs = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed")))
      with sharding.activate(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, xs).compile()
      hlo = compiled.as_text()
      ops = [c["op"] for c in hlo_lib.hlo_collectives(hlo)]
      a2a = hlo_lib.all_to_all_bytes(hlo)
      # Forward: tokens out and back; backward: the two transposes.
      assert ops.count("all-to-all") >= 4 if not dropless else ops.count("all-to-all") >= 5, ops
      # The buffer one device sends: [E, G_l * C, D] f32 (dropless: C = T, plus the mask).
      tokens_per_device = 8 * 6 // (shape[0] * shape[1] * shape[2])
      groups = tokens_per_device // 6
      c = 6 if dropless else math.ceil(1.25 * 2 * 6 / E)
      buffer_bytes = E * groups * c * D * 4
      per_a2a = [b["bytes"] for b in hlo_lib.hlo_collectives(hlo)
                 if b["op"] == "all-to-all" and b["shapes"][0][0] == "f32"]
      assert set(per_a2a) == {buffer_bytes}, (per_a2a, buffer_bytes)
      assert not _expert_weight_gathers(hlo, E), _expert_weight_gathers(hlo, E)
      mem = compiled.memory_analysis()
      all_expert_bytes = 3 * E * D * F * 4
      if mem is not None:  # arguments of one device: its shard of the experts, not all
        assert mem.argument_size_in_bytes < all_expert_bytes, mem
      print(f"hlo layer dropless={dropless} {shape} collectives={sorted(set(ops))} "
            f"a2a_bytes={a2a} args={getattr(mem, 'argument_size_in_bytes', None)}")
  print("ok")


def case_hlo_train_step(textdir, tfds_dir, workdir):
  """A real train step (moe.train.trainer.setup + moe.train.step) compiled on the (2,1,4,1) mesh."""
  import jax
  import jax.numpy as jnp
  from conftest import apply_overrides, load_config_file, tiny_overrides
  from moe import sharding
  from moe.train import trainer as train
  from moe.train import step as step_lib
  cfg = apply_overrides(load_config_file("default"), tiny_overrides(textdir, tfds_dir))
  apply_overrides(cfg, {**TRAIN_OVERRIDES, "mesh.data": 2, "mesh.expert": 4})
  s = train.setup(cfg, workdir)
  tx, frozen, schedule = step_lib.make_optimizer(cfg.train, s.abstract["params"])
  E = cfg.moe.num_experts
  # The state laid out as the trainer lays it out (optimizer state mirrors the params).
  abstract_opt, opt_sh = train._opt_shardings(tx, s.abstract["params"], s.shardings["params"],
                                              s.mesh)
  rep = sharding.replicated(s.mesh)
  with sharding.activate(s.mesh):
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
             "params": s.abstract["params"],
             "opt_state": jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                          sharding=sh),
                                       abstract_opt, opt_sh),
             "moe_bias": s.abstract["moe_bias"],
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    B, L = cfg.train.batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, L), jnp.float32 if k in ("loss_mask", "target_bytes")
                                     else jnp.int32, sharding=s.batch_sharding)
             for k in train.BATCH_KEYS}
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    step = jax.jit(step_lib.make_train_step(s.model, tx, frozen, schedule),
                   in_shardings=(state_sh, s.batch_sharding), out_shardings=(state_sh, None))
    hlo = step.lower(state, batch).compile().as_text()
  ops = [c["op"] for c in hlo_lib.hlo_collectives(hlo)]
  # 2 MoE layers x (2 forward + 2 backward) all-to-alls at least.
  assert ops.count("all-to-all") >= 4 * cfg.model.num_layers, ops
  assert not _expert_weight_gathers(hlo, E), _expert_weight_gathers(hlo, E)
  w_in = s.abstract["params"]["block_0"]["moe"]["experts"]["w_in"]
  assert w_in.sharding.shard_shape(w_in.shape)[0] == E // 4
  print(f"hlo train step all-to-all={ops.count('all-to-all')} "
        f"a2a_bytes={hlo_lib.all_to_all_bytes(hlo)}")
  print("ok")


def test_hlo_all_to_all_and_no_expert_gather(textdir, tfds_dir, tmp_path):
  out = on_8_devices("case_hlo_layer")
  assert out.strip().endswith("ok"), out
  out = on_8_devices("case_hlo_train_step", textdir, tfds_dir, str(tmp_path))
  assert out.strip().endswith("ok"), out


# ----------------------------------------------------------------------------- the trainer


# Tiny model, 8 experts, a batch of 8 rows of 16 tokens, groups of 16 tokens (one row: every
# mesh below holds whole groups, so all runs route the same groups), 4 steps, every step logged.
TRAIN_OVERRIDES = {
    "moe.num_experts": 8, "moe.num_selected": 2, "moe.group_size": 16, "moe.min_capacity": 1,
    "moe.capacity_factor": 1.0, "moe.eval_capacity_factor": 1.0,
    "model.vocab_size": 260,  # the byte tokenizer's 259, rounded up so `tensor` can split it
    "train.batch_size": 8, "train.steps": 4, "train.log_every": 1, "train.eval_every": 4,
    "train.eval_batches": 1, "train.checkpoint_every": 100,
}


def read_losses(workdir):
  from conftest import read_metrics
  return {r["step"]: {k: r[k] for k in ("loss", "cross_entropy", "aux_loss", "eval_loss",
                                        "moe/dropped_fraction") if k in r}
          for r in read_metrics(workdir)}


def trainer_meshes(dropless) -> list:
  """The meshes a trainer test runs on: three each (data, fsdp and expert, tensor in both sets;
  the layer tests cover all five), to keep the slow trainer compilations few."""
  if dropless in (True, "True"):
    return [MESHES[1], MESHES[4], MESHES[3]]
  return [MESHES[0], MESHES[2], MESHES[3]]


def case_trainer_runs(textdir, tfds_dir, root, dropless):
  """Trains the tiny model on each mesh (workdir root/<mesh>), counting how often the MoE layer
  took the expert-parallel path while tracing."""
  from conftest import apply_overrides, load_config_file, tiny_overrides
  from moe.layer import expert_parallel
  from moe.train import trainer as train
  calls = []
  real = expert_parallel.ExpertParallel.apply_experts
  expert_parallel.ExpertParallel.apply_experts = (
      lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
  for shape in trainer_meshes(dropless):
    cfg = apply_overrides(load_config_file("default"), tiny_overrides(textdir, tfds_dir))
    apply_overrides(cfg, TRAIN_OVERRIDES)
    apply_overrides(cfg, dict(zip([f"mesh.{a}" for a in ("data", "fsdp", "expert", "tensor")],
                                  shape)))
    if dropless:
      apply_overrides(cfg, {"moe.capacity_factor": None, "moe.eval_capacity_factor": None})
    name = "x".join(map(str, shape))
    summary = train.train_and_evaluate(cfg, os.path.join(root, name))
    assert summary["status"] == "completed", summary
    print(f"trainer {name} expert_parallel_traces={len(calls)}")
    calls.clear()


@pytest.mark.slow
@pytest.mark.parametrize("dropless", [False, True], ids=["capacity", "dropless"])
def test_trainer_matches_one_device(tiny_config, tmp_path, dropless):
  """moe.train.trainer.train_and_evaluate on three meshes each (`trainer_meshes`) logs the
  one-device losses (rel 1e-5)."""
  from moe.train import trainer as train
  overrides = dict(TRAIN_OVERRIDES, **{"mesh.data": -1})
  if dropless:
    overrides.update({"moe.capacity_factor": None, "moe.eval_capacity_factor": None})
  cfg = tiny_config(overrides)
  train.train_and_evaluate(cfg, str(tmp_path / "one_device"))
  ref = read_losses(tmp_path / "one_device")
  assert sorted(ref) == [1, 2, 3, 4] and "eval_loss" in ref[4]
  if not dropless:
    assert ref[1]["moe/dropped_fraction"] > 0  # the capacity really drops
  out = on_8_devices("case_trainer_runs", cfg.data.text_dir, cfg.data.tfds_data_dir,
                     str(tmp_path), dropless)
  for shape in trainer_meshes(dropless):
    name = "x".join(map(str, shape))
    traces = [int(l.split("=")[1]) for l in out.splitlines() if l.startswith(f"trainer {name} ")]
    assert traces and traces[0] > 0, f"{name}: the trainer never took the expert-parallel path"
    got = read_losses(tmp_path / name)
    assert sorted(got) == sorted(ref), name
    for step, want in ref.items():
      for key, value in want.items():
        assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, step, key)
