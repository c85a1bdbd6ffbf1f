"""Bad input: one line naming the field, a non-zero exit, and nothing compiled before it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import jax
import jax.monitoring
import jax.numpy as jnp
import pytest

from conftest import REPO, load_config_file, one_line_error
from moe.data import pipeline as data_lib
from moe.train import checkpoint as ckpt_lib
from moe.train import trainer as train
from moe.train import step as step_lib

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA compilations while active (jax.monitoring events)."""

  def __init__(self):
    self.count = 0

  def _listen(self, name, secs, **kw):
    del secs, kw
    if name == COMPILE_EVENT:
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)
    return False


def expect_config_error(cfg, workdir, *needles):
  """train_and_evaluate raises a one-line ConfigError naming `needles`, compiling nothing."""
  with CompileCounter() as compiles, one_line_error(*needles) as err:
    train.train_and_evaluate(cfg, workdir)
  message = str(err.value)
  assert compiles.count == 0, f"{compiles.count} compilation(s) before the error: {message}"
  return message


def run_launch(args, **kw):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300, **kw)


def assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize("overrides, needles", [
    ({"moe.num_selected": 5}, ("moe.num_selected", "moe.num_experts")),
    ({"model.d_model": -8}, ("model.d_model", "[1, 2147483647]")),
    ({"moe.expert_hidden": 0}, ("moe.expert_hidden",)),
    ({"data.seq_len": 64}, ("data.seq_len", "model.max_len")),
    ({"data.name": "no_such_dataset_anywhere"}, ("data.name", "no_such_dataset_anywhere")),
    ({"train.batch_size": 0}, ("train.batch_size",)),
    ({"train.trainable": "experts"}, ("train.trainable", "router_frozen")),
    ({"train.upcycle": True}, ("train.upcycle", "train.init_from")),
    ({"train.init_from": "/nonexistent/run"}, ("train.init_from", "/nonexistent/run")),
    ({"train.min_lr_ratio": 2.0}, ("train.min_lr_ratio",)),
    ({"train.upcycle_noise": -0.1}, ("train.upcycle_noise", "[0.0, inf)")),
    ({"mesh.data": 3}, ("mesh",)),
    ({"moe.capacity_factor": -1.0}, ("moe.capacity_factor",)),
    ({"model.first_moe_layer": 2}, ("model.first_moe_layer", "model.num_layers (2)")),
    ({"model.vocab_size": 10}, ("model.vocab_size=10", "259")),  # after the tokenizer is built
    ({"train.learning_rate": float("inf")}, ("train.learning_rate", "finite")),
])
def test_bad_config_is_one_line_before_compiling(tiny_config, tmp_path, overrides, needles):
  expect_config_error(tiny_config(overrides), str(tmp_path / "run"), *needles)


def test_unwritable_workdir(tiny_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  expect_config_error(tiny_config(), str(blocker / "run"), "--workdir", str(blocker / "run"))


def _fake_checkpoint(cfg, workdir):
  """A checkpoint of `cfg`'s full training state (zeros), written without compiling a model."""
  s = train.setup(cfg, workdir)
  tx, _, _ = step_lib.make_optimizer(cfg.train, s.abstract["params"])
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  state = {"step": jnp.zeros((), jnp.int32), "params": zeros(s.abstract["params"]),
           "opt_state": zeros(jax.eval_shape(tx.init, s.abstract["params"])),
           "moe_bias": zeros(s.abstract["moe_bias"]), "rng": jnp.zeros((2,), jnp.uint32)}
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  c.save(3, state, s.data.train_iter.get_state())
  c.close()


def test_incompatible_checkpoint_names_the_param(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  _fake_checkpoint(tiny_config(), workdir)
  msg = expect_config_error(tiny_config({"moe.num_experts": 8}), workdir, "--workdir")
  # The first differing param, with both shapes (E=4 saved, E=8 wanted).
  assert "params/block_0/moe/experts/w_gate has shape (4, 16, 16) in the checkpoint but " \
         "(8, 16, 16) in the model" in msg, msg
  msg = expect_config_error(tiny_config({"moe.expert_hidden": 24}), workdir)
  assert "(4, 16, 16) in the checkpoint but (4, 16, 24)" in msg, msg


def test_init_from_incompatible(tiny_config, tmp_path):
  src = str(tmp_path / "src")
  _fake_checkpoint(tiny_config(), src)
  msg = expect_config_error(tiny_config({"model.d_model": 24, "train.init_from": src}),
                            str(tmp_path / "dst"), "train.init_from")
  assert "in the checkpoint but" in msg and "(24" in msg, msg


def count_calls(monkeypatch, module_name, name, log, skip=()):
  """Every moe module's reference to `module_name.name` (but those in `skip`) appends `name` to
  `log` when called, so a second caller anywhere shows up."""
  original = getattr(importlib.import_module(module_name), name)
  for mod_name in skip:  # imported now, so that it keeps the original
    importlib.import_module(mod_name)

  def counted(*args, **kwargs):
    log.append(name)
    return original(*args, **kwargs)

  for mod_name, mod in list(sys.modules.items()):
    if (mod_name == "moe" or mod_name.startswith("moe.")) and mod_name not in skip and getattr(
        mod, name, None) is original:
      monkeypatch.setattr(mod, name, counted)


def test_setup_runs_each_check_once_before_the_data(tiny_config, tmp_path, monkeypatch):
  """The model, data and mesh checks run once each, in validate_config's order, all before
  make_data. (The Transformer's trace-time guard, for a ModelConfig built in code, is left out.)"""
  log = []
  count_calls(monkeypatch, "moe.model.config", "validate_model", log,
              skip=("moe.model.transformer",))
  count_calls(monkeypatch, "moe.data.pipeline", "validate_data", log)
  count_calls(monkeypatch, "moe.sharding", "validate_mesh", log)
  count_calls(monkeypatch, "moe.data.pipeline", "make_data", log)
  train.setup(tiny_config(), str(tmp_path / "run"))
  assert log == ["validate_model", "validate_data", "validate_mesh", "make_data"]


@pytest.mark.parametrize("overrides, needle", [
    ({"model.num_kv_heads": 3}, "model.num_kv_heads"),
    ({"model.scan_layers": True, "model.moe_interval": 2}, "model.scan_layers"),
])
def test_model_error_wins_over_missing_data(tiny_config, tmp_path, monkeypatch, overrides,
                                            needle):
  missing = {"data.text_dir": str(tmp_path / "no_such_texts")}
  expect_config_error(tiny_config(missing), str(tmp_path / "run"), "data.text_dir")

  def no_data(*args, **kwargs):
    raise AssertionError("make_data was called before the model was checked")

  monkeypatch.setattr(data_lib, "make_data", no_data)
  expect_config_error(tiny_config({**missing, **overrides}), str(tmp_path / "run"), needle)


def test_default_configs_validate():
  for name in ("default", "dense"):
    cfg = load_config_file(name)
    train.validate_config(cfg)


def test_dense_config_matches_active_params():
  """configs/dense.py: the same model with dense FFNs of width K*F (equal active FFN params)."""
  from moe.model.config import model_config_from
  from moe.model.transformer import active_params
  moe_cfg, dense_cfg = load_config_file("default"), load_config_file("dense")
  assert not dense_cfg.moe.enabled
  assert dense_cfg.model.d_ff == moe_cfg.moe.num_selected * moe_cfg.moe.expert_hidden
  a = active_params(model_config_from(moe_cfg, vocab_size=259))
  d = active_params(model_config_from(dense_cfg, vocab_size=259))
  # Only the routers differ (D*E per layer).
  router = moe_cfg.model.num_layers * moe_cfg.model.d_model * moe_cfg.moe.num_experts
  assert a - d == router


# ----------------------------------------------------------------------------- launch.py


def test_launch_unknown_config_field(tmp_path):
  proc = run_launch(["--config=configs/default.py", f"--workdir={tmp_path}",
                     "--config.moe.num_expert=4"])
  assert_one_line_error(proc, "num_expert", "moe")


def test_launch_k_greater_than_e(tmp_path):
  proc = run_launch(["--config=configs/default.py", f"--workdir={tmp_path}",
                     "--config.moe.num_selected=9"])
  assert_one_line_error(proc, "moe.num_selected", "K=9", "E=8")


def test_launch_unparsable_value_and_missing_workdir(tmp_path):
  proc = run_launch(["--config=configs/default.py", f"--workdir={tmp_path}",
                     "--config.moe.num_experts=eight"])
  assert_one_line_error(proc, "moe.num_experts")
  proc = run_launch(["--config=configs/default.py"])
  assert_one_line_error(proc, "--workdir")


def test_launch_unwritable_workdir(tmp_path, tiny_flags):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = run_launch(["--config=configs/default.py", f"--workdir={blocker}/run", *tiny_flags()])
  assert_one_line_error(proc, "--workdir")


def test_launch_incompatible_checkpoint(tmp_path, tiny_config, tiny_flags):
  workdir = str(tmp_path / "run")
  _fake_checkpoint(tiny_config(), workdir)
  proc = run_launch(["--config=configs/default.py", f"--workdir={workdir}",
                     *tiny_flags({"moe.num_experts": 8})])
  assert_one_line_error(proc, "params/block_0/moe/experts/w_gate", "(4, 16, 16)", "(8, 16, 16)")


def test_top1_renormalize_warns(tiny_config):
  from moe.train.checks import config_warnings
  (w,) = config_warnings(tiny_config({"moe.num_selected": 1, "moe.renormalize": True}))
  assert "moe.renormalize" in w and "\n" not in w
  assert config_warnings(tiny_config({"moe.num_selected": 1, "moe.renormalize": False})) == []
  assert config_warnings(tiny_config({"moe.num_selected": 2})) == []
  assert config_warnings(tiny_config({"moe.num_selected": 1, "moe.enabled": False})) == []
