"""The trainer end to end on a tiny model and a tiny text folder (see conftest.py)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import read_metrics
from moe import trees
from moe.train import checkpoint as ckpt_lib
from moe.train import trainer as train
from moe.train import step as step_lib
from moe.errors import ConfigError

# Exact resume with every source of state on: balancing bias, router jitter, drops.
STATEFUL = {"moe.bias_balancing": True, "moe.bias_rate": 1e-2, "moe.jitter_eps": 0.1,
            "moe.capacity_factor": 1.0, "train.steps": 8, "train.log_every": 2,
            "train.eval_every": 4, "train.checkpoint_every": 4}


def test_trains_and_logs_every_field(tiny_config, tmp_path):
  cfg = tiny_config({"train.steps": 4, "train.log_every": 2, "train.eval_every": 4})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["status"] == "completed" and summary["step"] == 4
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [2, 4]
  first, last = records
  for key in ("loss", "cross_entropy", "aux_loss", "load_balance_loss", "z_loss", "grad_norm",
              "learning_rate", "tokens_per_s", "steps_per_s", "moe/layer_0/max_over_mean_load",
              "moe/layer_1/max_over_mean_load", "moe/max_over_mean_load", "moe/layer_0/load",
              "moe/layer_0/dead_experts", "moe/dead_experts", "moe/dropped_fraction",
              "moe/router_entropy", "moe/top1_prob"):
    assert key in first, key
    if not isinstance(first[key], list):
      assert math.isfinite(first[key]), key
  for key in ("eval_loss", "eval_cross_entropy", "eval_bits_per_byte"):
    assert key in last and math.isfinite(last[key]) and key not in first
  # The logged pieces add up: loss = CE + sum over layers of each layer's aux_loss.
  layer_aux = first["moe/layer_0/aux_loss"] + first["moe/layer_1/aux_loss"]
  assert first["aux_loss"] == pytest.approx(layer_aux, rel=1e-5)
  assert first["loss"] == pytest.approx(first["cross_entropy"] + first["aux_loss"], rel=1e-5)
  assert first["moe/load_balance_loss"] == pytest.approx(
      (first["moe/layer_0/load_balance_loss"] + first["moe/layer_1/load_balance_loss"]) / 2)
  assert sum(first["moe/layer_0/load"]) == pytest.approx(1.0, abs=1e-4)
  # Learning rate: the mean of steps 0 and 1 of the warmup (2 steps to 1e-2).
  assert first["learning_rate"] == pytest.approx((0.5e-2 + 1e-2) / 2, rel=1e-5)
  # Bits per byte = summed nats / ln 2 / summed UTF-8 bytes of the targets.
  from moe.data import pipeline as data_lib
  batches = data_lib.make_data(cfg, workdir=str(tmp_path)).eval_batches()
  n_bytes = sum(float(b["target_bytes"].sum()) for b in batches)
  n_tokens = sum(float(b["loss_mask"].sum()) for b in batches)
  assert last["eval_tokens"] == n_tokens
  assert last["eval_bits_per_byte"] == pytest.approx(
      last["eval_cross_entropy"] * n_tokens / math.log(2) / n_bytes, rel=1e-5)
  with open(tmp_path / "summary.json") as f:
    on_disk = json.load(f)
  assert on_disk["status"] == "completed" and on_disk["eval_loss"] == last["eval_loss"]
  assert on_disk["tokens_per_s"] > 0 and on_disk["wall_time_s"] > 0
  assert on_disk["num_active_params"] < on_disk["num_params"]
  assert ckpt_lib.resolve(str(tmp_path)) == (str(tmp_path / "checkpoints"), 4)
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))


def _state_and_batch(cfg, workdir):
  """Real setup + init (what the trainer does), and one fixed training batch."""
  s = train.setup(cfg, workdir)
  variables = jax.jit(s.init_fn)(jax.random.PRNGKey(0))
  tx, frozen, schedule = step_lib.make_optimizer(cfg.train, variables["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
           "opt_state": tx.init(variables["params"]), "moe_bias": variables["moe_bias"],
           "rng": jax.random.PRNGKey(1)}
  batch = train.global_batch(next(s.data.train_iter), s.batch_sharding)
  step = jax.jit(step_lib.make_train_step(s.model, tx, frozen, schedule))
  return state, batch, step, frozen


def test_overfits_one_batch(tiny_config, tmp_path):
  cfg = tiny_config({"train.steps": 60, "train.warmup_steps": 5, "train.learning_rate": 1e-2,
                     "train.weight_decay": 0.0})
  state, batch, step, _ = _state_and_batch(cfg, str(tmp_path))
  losses = []
  for _ in range(60):
    state, m = step(state, batch)
    losses.append(float(m["cross_entropy"]))
  assert all(math.isfinite(x) for x in losses)
  assert losses[0] > 4.0  # ~ln(259) at init
  assert losses[-1] < 0.35 * losses[0], losses[::10]


@pytest.mark.parametrize("stop, checkpoint_every", [(4, 4), (3, 3)])
def test_exact_resume(tiny_config, tmp_path, stop, checkpoint_every):
  """N steps in one go == `stop` steps, stop, resume to N: same bits, logs, bias, data position.

  Stopping at 3 with log_every=2 resumes inside a logging window: the window saved with the
  checkpoint makes the step-4 record average steps 3 and 4 as in the uninterrupted run."""
  overrides = {**STATEFUL, "train.checkpoint_every": checkpoint_every}
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  s_full = train.train_and_evaluate(tiny_config(overrides), full)
  s_half = train.train_and_evaluate(tiny_config(overrides), split, stop_at_step=stop)
  assert s_half["status"] == "preempted" and s_half["step"] == stop
  s_rest = train.train_and_evaluate(tiny_config(overrides), split)
  assert s_rest["status"] == "completed" and s_rest["resumed_from_step"] == stop
  assert s_full["eval_loss"] == s_rest["eval_loss"]

  def final(workdir):
    directory, step = ckpt_lib.resolve(workdir)
    assert step == 8
    out = ckpt_lib.load_state_items(directory, _abstract_like_saved(directory, step),
                                    where="test")
    return jax.device_get(out), ckpt_lib.load_data_state(workdir)

  (a, data_a), (b, data_b) = final(full), final(split)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  bias = a["moe_bias"]["block_0"]["moe"]["bias"]
  assert np.any(bias != 0)  # the bias really moved
  assert data_a == data_b
  logged_full = read_metrics(full, drop_timing=True)
  assert [r["step"] for r in logged_full] == [2, 4, 6, 8]
  assert logged_full == read_metrics(split, drop_timing=True)


def _abstract_like_saved(directory, step):
  """ShapeDtypeStructs (replicated on this host) for params and moe_bias of a checkpoint."""
  shapes = ckpt_lib.saved_state_shapes(directory, step)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = {}
  for name, shape in shapes.items():
    top, *rest = name.split("/")
    if top not in ("params", "moe_bias"):
      continue
    node = out.setdefault(top, {})
    for k in rest[:-1]:
      node = node.setdefault(k, {})
    node[rest[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  return out


def test_init_from_loads_params_with_fresh_optimizer(tiny_config, tmp_path):
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  train.train_and_evaluate(tiny_config({"train.steps": 4}), src)
  cfg = tiny_config({"train.steps": 4, "train.init_from": src})
  summary = train.train_and_evaluate(cfg, dst, stop_at_step=0)
  assert summary["status"] == "preempted" and summary["step"] == 0
  a = ckpt_lib.load_params(src)
  b = ckpt_lib.load_params(dst)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y)
  directory, step = ckpt_lib.resolve(dst)
  assert step == 0
  counts = _saved_optimizer_counts(directory, step)
  assert counts and all(c == 0 for c in counts.values()), counts  # a fresh optimizer state


def _saved_optimizer_counts(directory, step) -> dict[str, np.ndarray]:
  """{'opt_state/.../count': value} of a checkpoint (Adam's step counts), read as numpy."""
  path = os.path.join(directory, str(step), ckpt_lib.STATE)
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path).item_metadata.tree["opt_state"]
  as_numpy = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  opt_state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item={"opt_state": meta}, restore_args={"opt_state": as_numpy},
      partial_restore=True))["opt_state"]
  named = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return {"opt_state/" + "/".join(trees.key_names(p)): x for p, x in named
          if trees.key_names(p)[-1] == "count"}


def test_divergence_is_a_status_not_a_crash(tiny_config, tmp_path):
  cfg = tiny_config({"train.steps": 6, "train.learning_rate": 1e30, "train.grad_clip": 0.0,
                     "train.warmup_steps": 0})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["status"] == "diverged" and summary["step"] < 6
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["status"] == "diverged"


def test_preempted_diverged_state_is_not_saved(tiny_config, tmp_path):
  # Preempted between logging windows with a non-finite loss in the unlogged steps: the run is
  # diverged and nothing is saved (the preemption save must not keep a NaN state).
  cfg = tiny_config({"train.steps": 6, "train.learning_rate": 1e30, "train.grad_clip": 0.0,
                     "train.warmup_steps": 0, "train.log_every": 6, "train.eval_every": 6,
                     "train.checkpoint_every": 6})
  summary = train.train_and_evaluate(cfg, str(tmp_path), stop_at_step=3)
  assert summary["status"] == "diverged", summary
  with pytest.raises(ConfigError):
    ckpt_lib.resolve(str(tmp_path))


def test_evaluate_with_other_eval_capacity(tiny_config, tmp_path):
  train.train_and_evaluate(tiny_config({"train.steps": 4}), str(tmp_path))
  base = train.evaluate(tiny_config({"train.steps": 4}), str(tmp_path))
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert base["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
  tight = train.evaluate(tiny_config({"train.steps": 4, "moe.eval_capacity_factor": 0.25,
                                      "moe.min_capacity": 1}), str(tmp_path))
  assert tight["eval_moe/dropped_fraction"] > base["eval_moe/dropped_fraction"]


# ----------------------------------------------------------------------------- launch.py, processes


def _launch(args, env=None, timeout=600):
  import subprocess
  import sys
  from conftest import REPO
  return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_launch_dropless_from_the_command_line(tmp_path, tiny_flags):
  """`--config.moe.capacity_factor=None` (a placeholder field) reaches the trainer: no drops."""
  proc = _launch(["--config=configs/default.py", f"--workdir={tmp_path}", *tiny_flags(),
                  "--config.moe.capacity_factor=None", "--config.moe.eval_capacity_factor=None"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr  # the progress line
  records = read_metrics(tmp_path)
  drops = [r[k] for r in records for k in ("moe/dropped_fraction", "eval_moe/dropped_fraction")
           if k in r]
  assert drops and all(d == 0.0 for d in drops)
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["status"] == "completed"


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_flags, tiny_config):
  """Two processes (jax.distributed on localhost, CPU collectives) == one process.

  Routing groups never cross devices (moe.layer.expert_parallel), so both runs use groups of 32
  tokens: one per process there, two in the one-process batch of 4 rows of 16."""
  import subprocess
  import sys
  from conftest import REPO
  overrides = {"train.steps": 4, "train.eval_every": 4, "moe.group_size": 32}
  flags = ["--config=configs/default.py", *tiny_flags(overrides)]
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO)
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch.py"), *flags, f"--workdir={multi}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  single = str(tmp_path / "single")
  train.train_and_evaluate(tiny_config(overrides), single)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  with open(os.path.join(multi, "summary.json")) as f:
    m = json.load(f)
  with open(os.path.join(single, "summary.json")) as f:
    s = json.load(f)
  assert m["processes"] == 2 and s["processes"] == 1
  assert m["eval_cross_entropy"] == pytest.approx(s["eval_cross_entropy"], rel=1e-5)
  a, b = ckpt_lib.load_params(multi), ckpt_lib.load_params(single)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # Each process saved its own data position.
  names = os.listdir(os.path.join(multi, "checkpoints", "4", "data"))
  assert sorted(n for n in names if n.endswith(".json")) == ["process_0-of-2.json",
                                                            "process_1-of-2.json"]


@pytest.mark.slow
def test_resume_onto_another_mesh(tmp_path, tiny_flags):
  """4 devices: a run trained data-parallel (data=4) is cut back to its step-3 checkpoint and
  resumed expert-parallel (data=2, expert=2); it ends where the data-parallel run ended."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  # One routing group per row on both meshes (each device holds one row of 16 tokens).
  flags = ["--config=configs/default.py", *tiny_flags({"train.steps": 6, "moe.group_size": 16,
                                                       "train.checkpoint_every": 3})]
  run = str(tmp_path / "run")
  first = _launch([*flags, f"--workdir={run}"], env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(run, "summary.json")) as f:
    expected = json.load(f)
  assert expected["mesh"]["data"] == 4
  params_data_parallel = ckpt_lib.load_params(run)
  import shutil
  shutil.rmtree(os.path.join(run, "checkpoints", "6"))
  second = _launch([*flags, f"--workdir={run}", "--config.mesh.data=2",
                    "--config.mesh.expert=2"], env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  with open(os.path.join(run, "summary.json")) as f:
    resumed = json.load(f)
  assert resumed["resumed_from_step"] == 3 and resumed["mesh"]["expert"] == 2
  assert resumed["eval_cross_entropy"] == pytest.approx(expected["eval_cross_entropy"], rel=1e-4)
  for x, y in zip(jax.tree.leaves(ckpt_lib.load_params(run)),
                  jax.tree.leaves(params_data_parallel)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- pieces (no compile)


def test_learning_rate_schedule():
  from ml_collections import ConfigDict
  tc = ConfigDict({"learning_rate": 1.0, "warmup_steps": 4, "steps": 14, "min_lr_ratio": 0.1})
  lr = step_lib.learning_rate_schedule(tc)
  got = [float(lr(s)) for s in range(16)]
  assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # update 0 already moves
  assert got[4] == pytest.approx(1.0)
  assert got[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert got[14] == pytest.approx(0.1) and got[15] == pytest.approx(0.1)  # floor, then flat
  assert all(a >= b for a, b in zip(got[4:], got[5:]))


def _shapes(**model):
  from moe.model.config import ModelConfig
  from moe.layer.config import MoeConfig
  from moe.model.transformer import param_shapes
  cfg = ModelConfig(vocab_size=11, d_model=8, num_layers=3, num_heads=2, num_kv_heads=2,
                    head_dim=4, d_ff=12, max_len=8,
                    moe=MoeConfig(num_experts=4, num_selected=2, expert_hidden=6,
                                  num_shared_experts=1), **model)
  return param_shapes(cfg)


def _names(tree, pick):
  return sorted(jax.tree_util.keystr(p) for p, v in
                jax.tree_util.tree_flatten_with_path(tree)[0] if pick(v))


@pytest.mark.parametrize("scan", [False, True])
def test_trainable_masks(scan):
  params = _shapes(scan_layers=scan)
  everything = _names(params, lambda v: True)
  moe_part = [n for n in everything if "'moe'" in n]
  routers = [n for n in moe_part if "'router'" in n]
  assert routers and len(moe_part) > len(routers)  # experts + shared experts + routers
  assert any("'shared'" in n for n in moe_part)
  frozen = lambda mode: _names(step_lib.frozen_mask(params, mode), bool)
  assert frozen("all") == []
  assert frozen("non_moe") == sorted(moe_part)
  assert frozen("moe") == sorted(set(everything) - set(moe_part))
  assert frozen("router_frozen") == sorted(routers)
  with pytest.raises(ValueError, match="train.trainable"):
    step_lib.frozen_mask(params, "experts")


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_skips_norms_and_biases(scan):
  params = _shapes(scan_layers=scan, attention_bias=True, norm="layer")
  decayed = _names(step_lib.decay_mask(params), bool)
  kept = _names(step_lib.decay_mask(params), lambda v: not v)
  assert kept and all(any(s in n for s in ("scale", "bias", "'b_")) for n in kept), kept
  assert any("q_bias" in n for n in kept)  # a 2-D bias [heads, head_dim] is still a bias
  assert any("'w_in'" in n for n in decayed) and any("kernel" in n for n in decayed)


def test_moe_layer_stats_finds_every_layer():
  E = 3
  one = lambda v: {"aux_loss": jnp.float32(v), "load": jnp.full((E,), v)}
  tree = {"block_10": {"moe": {"moe": (one(10.0),)}}, "block_2": {"moe": {"moe": (one(2.0),)}},
          "block_1": {"mlp": {}}, "deep": {"x": {"block_4": {"moe": {"moe": (one(4.0),)}}}}}
  layers = step_lib.moe_layer_stats(tree)
  assert [n for n, _ in layers] == ["layer_2", "layer_4", "layer_10"]  # natural block order
  assert [float(d["aux_loss"]) for _, d in layers] == [2.0, 4.0, 10.0]
  stacked = {"blocks": {"moe": {"moe": ({"aux_loss": jnp.arange(3.0),
                                         "load": jnp.ones((3, E))},)}}}
  layers = step_lib.moe_layer_stats(stacked)
  assert [n for n, _ in layers] == ["layer_0", "layer_1", "layer_2"]
  assert [float(d["aux_loss"]) for _, d in layers] == [0.0, 1.0, 2.0]
  assert layers[1][1]["load"].shape == (E,)
  assert step_lib.moe_layer_stats({}) == []


def test_moe_layer_stats_on_a_scanned_model():
  """The real sow of a scanned model (leading layer axis) splits into its layers."""
  from moe.model.config import ModelConfig
  from moe.layer.config import MoeConfig
  from moe.model.transformer import Transformer
  cfg = ModelConfig(vocab_size=11, d_model=8, num_layers=3, num_heads=2, num_kv_heads=2,
                    head_dim=4, d_ff=12, max_len=8, scan_layers=True,
                    moe=MoeConfig(num_experts=4, num_selected=2, expert_hidden=6))
  model = Transformer(cfg)
  tokens = jnp.zeros((2, 8), jnp.int32)

  def run():
    variables = model.init(jax.random.PRNGKey(0), tokens)
    _, mut = model.apply({"params": variables["params"]}, tokens, train=False,
                         mutable=["intermediates"])
    return {name: d for name, d in step_lib.moe_layer_stats(mut["intermediates"])}

  layers = jax.eval_shape(run)
  assert sorted(layers) == ["layer_0", "layer_1", "layer_2"]
  assert layers["layer_1"]["aux_loss"].shape == () and layers["layer_1"]["load"].shape == (4,)


def test_summarize_window():
  from moe.train import metrics as metrics_lib
  w = [{"loss": 2.0, "moe/layer_0/load": np.array([0.5, 0.5, 0.0]),
        "moe/layer_0/z_loss": 1.0, "moe/layer_1/load": np.array([1.0, 0.0, 0.0]),
        "moe/layer_1/z_loss": 3.0},
       {"loss": 4.0, "moe/layer_0/load": np.array([0.0, 0.5, 0.5]),
        "moe/layer_0/z_loss": 3.0, "moe/layer_1/load": np.array([1.0, 0.0, 0.0]),
        "moe/layer_1/z_loss": 5.0}]
  r = metrics_lib.summarize_window(w)
  assert r["loss"] == 3.0
  assert r["moe/layer_0/dead_experts"] == 0  # expert 2 was used in the 2nd step
  assert r["moe/layer_1/dead_experts"] == 2
  assert r["moe/dead_experts"] == 2
  assert r["moe/layer_0/load"] == [0.25, 0.5, 0.25]
  assert r["moe/z_loss"] == 3.0 and r["z_loss"] == 3.0  # mean over layers of window means
