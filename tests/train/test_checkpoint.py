"""moe.train.checkpoint: round trip, retention, atomicity, compatibility, other meshes, SIGTERM/SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, read_metrics
from moe.train import checkpoint as ckpt_lib
from moe.train import preemption
from moe.errors import ConfigError


def _state(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"dense": {"kernel": jax.random.normal(k[0], (5, 3))},
            "moe": {"router": {"kernel": jax.random.normal(k[1], (3, 4))},
                    "experts": {"w_in": jax.random.normal(k[2], (4, 3, 7))}}}
  tx = optax.multi_transform({"a": optax.adamw(1e-3), "b": optax.set_to_zero()},
                             {"dense": {"kernel": "b"}, "moe": {"router": {"kernel": "a"},
                                                                "experts": {"w_in": "a"}}})
  opt = tx.init(params)
  opt = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, opt)
  return {"step": jnp.int32(7), "params": params, "opt_state": opt,
          "moe_bias": {"moe": {"bias": jnp.arange(4, dtype=jnp.float32) * -0.25}},
          "rng": jax.random.PRNGKey(seed + 11)}


def _assert_same(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x, y), jax.tree_util.keystr(path)


def test_round_trip_and_retention(tmp_path):
  c = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=2)
  states = {s: _state(s) for s in (1, 2, 3)}
  for s, st in states.items():
    c.save(s, st, {"position": s, "nested": {"epoch": [s, "x"]}})
  c.wait()
  assert c.all_steps() == [2, 3] and c.latest_step() == 3  # keep the last 2
  restored, data_state = c.restore(3, ckpt_lib.abstract_like(states[3]))
  _assert_same(states[3], restored)
  assert data_state == {"position": 3, "nested": {"epoch": [3, "x"]}}
  assert type(restored["opt_state"]) is type(states[3]["opt_state"])
  c.close()
  # Readers: params only (numpy, no target), data state only, a directory that is a workdir.
  _assert_same(states[3]["params"], ckpt_lib.load_params(tmp_path))
  _assert_same(states[2]["params"], ckpt_lib.load_params(tmp_path / "checkpoints" / "2"))
  assert ckpt_lib.load_data_state(tmp_path)["position"] == 3
  files = os.listdir(tmp_path / "checkpoints" / "3" / "data")
  assert "process_0-of-1.json" in files


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
  directory = tmp_path / "checkpoints"
  c = ckpt_lib.Checkpointer(directory)
  c.save(1, _state(), {"p": 1})
  c.close()
  # What a kill during a save leaves behind: Orbax's temporary directory, never renamed.
  tmp = directory / "2.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_text("half written")
  assert ckpt_lib.resolve(tmp_path) == (str(directory), 1)
  c = ckpt_lib.Checkpointer(directory)
  assert c.latest_step() == 1
  for _ in range(200):  # cleaned (in the background) when a run opens the directory
    if not tmp.exists():
      break
    time.sleep(0.05)
  assert not tmp.exists()
  c.close()


def test_resolve_errors(tmp_path):
  with pytest.raises(ConfigError, match="no checkpoint found"):
    ckpt_lib.resolve(tmp_path / "nothing")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ConfigError, match="no checkpoint found"):
    ckpt_lib.resolve(tmp_path / "empty")


def test_compatibility_names_first_difference(tmp_path):
  c = ckpt_lib.Checkpointer(tmp_path)
  c.save(5, _state(), {})
  c.close()
  saved = ckpt_lib.saved_state_shapes(tmp_path, 5)
  assert saved["params/moe/experts/w_in"] == (4, 3, 7)
  good = ckpt_lib.abstract_like(_state())
  ckpt_lib.check_compatible(saved, good, where="w", fix="f")  # no error

  wider = _state()
  wider["params"]["moe"]["experts"]["w_in"] = jnp.zeros((8, 3, 7))
  with pytest.raises(ConfigError) as e:
    ckpt_lib.check_compatible(saved, ckpt_lib.abstract_like(wider), where="ckpt X", fix="fix Y")
  assert str(e.value) == ("ckpt X does not fit this model: params/moe/experts/w_in has shape "
                          "(4, 3, 7) in the checkpoint but (8, 3, 7) in the model; fix Y")
  extra = _state()
  extra["params"]["moe"]["shared"] = {"w_in": jnp.zeros((3, 2))}
  with pytest.raises(ConfigError, match="params/moe/shared/w_in is in the model"):
    ckpt_lib.check_compatible(saved, ckpt_lib.abstract_like(extra), where="w", fix="f")
  fewer = _state()
  del fewer["params"]["dense"]
  with pytest.raises(ConfigError, match="params/dense/kernel .* is in the checkpoint but not"):
    ckpt_lib.check_compatible(saved, ckpt_lib.abstract_like(fewer["params"]), where="w",
                              fix="f", prefix="params/")
  with pytest.raises(ConfigError, match="params/moe/experts/w_in has shape"):
    ckpt_lib.load_params(tmp_path, ckpt_lib.abstract_like(wider["params"]))


def test_restores_onto_another_mesh(tmp_path):
  """Saved sharded over 4 devices, restored onto a 2x2 mesh with a different layout."""
  script = textwrap.dedent(f"""
      import sys; sys.path.insert(0, {REPO!r})
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from moe.train import checkpoint as ckpt_lib
      devs = np.array(jax.devices())
      assert len(devs) == 4
      m1 = Mesh(devs.reshape(4), ("x",))
      w = jax.device_put(jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6),
                         NamedSharding(m1, P("x", None)))
      state = {{"params": {{"w": w}}, "step": jnp.int32(3)}}
      c = ckpt_lib.Checkpointer({str(tmp_path)!r}); c.save(3, state, {{"p": 3}}); c.close()
      m2 = Mesh(devs.reshape(2, 2), ("a", "b"))
      target = {{"params": {{"w": jax.ShapeDtypeStruct((8, 6), jnp.float32,
                                  sharding=NamedSharding(m2, P("b", "a")))}},
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(m2, P()))}}
      c = ckpt_lib.Checkpointer({str(tmp_path)!r})
      out, data = c.restore(3, target)
      assert out["params"]["w"].sharding == target["params"]["w"].sharding
      assert np.array_equal(np.asarray(out["params"]["w"]), np.asarray(w))
      assert data == {{"p": 3}} and int(out["step"]) == 3
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_preemption_guard_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
      if guard.requested():
        break
      time.sleep(0.01)
    assert guard.requested()
  assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------- real runs


def _launch(workdir, flags, **kw):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, os.path.join(REPO, "launch.py"),
                           "--config=configs/default.py", f"--workdir={workdir}", *flags],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def _wait_for_step(proc, workdir, step, timeout=300):
  """Polls metrics.jsonl until a record of `step` or later exists (mid-training, not compiling)."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, "the run ended before it was interrupted"
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
      if steps and max(steps) >= step:
        return
    time.sleep(0.005)
  raise AssertionError("the run did not reach the step in time")


def _assert_same_bits(a, b):
  """Across processes and interruptions: the same bits (resume is exact, also mid-window)."""
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    assert np.array_equal(np.asarray(y), np.asarray(x)), jax.tree_util.keystr(path)


def _assert_same_records(a, b):
  """Every record equal (timing fields dropped by the caller), none duplicated or missing."""
  assert [r["step"] for r in a] == [r["step"] for r in b]
  assert a == b


LONG = {"train.steps": 60, "train.log_every": 2, "train.eval_every": 30,
        "train.checkpoint_every": 3, "moe.bias_balancing": True, "moe.jitter_eps": 0.1}


def _reference_and_run_until(tmp_path, tiny_config, tiny_flags, step):
  """Trains LONG uninterrupted in this process (workdir tmp_path/ref), then starts it with
  launch.py (tmp_path/run) and waits until that run has logged `step`: (ref, workdir, proc)."""
  from moe.train import trainer as train
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(tiny_config(LONG), ref)
  workdir = str(tmp_path / "run")
  proc = _launch(workdir, tiny_flags(LONG))
  _wait_for_step(proc, workdir, step)
  return ref, workdir, proc


def _rerun_and_compare(ref, workdir, tiny_flags) -> str:
  """Runs the same launch.py command again; it completes with the reference's final params and
  metrics. Returns its stderr."""
  proc = _launch(workdir, tiny_flags(LONG))
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["status"] == "completed"
  _assert_same_bits(ckpt_lib.load_params(ref), ckpt_lib.load_params(workdir))
  _assert_same_records(read_metrics(ref, drop_timing=True),
                       read_metrics(workdir, drop_timing=True))
  return err


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, tiny_flags, tiny_config):
  ref, workdir, proc = _reference_and_run_until(tmp_path, tiny_config, tiny_flags, 10)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "preempted" and 10 <= summary["step"] < 60, summary
  assert ckpt_lib.resolve(workdir)[1] == summary["step"]  # saved at the step it stopped
  _rerun_and_compare(ref, workdir, tiny_flags)


@pytest.mark.slow
def test_sigkill_then_same_command_completes_identically(tmp_path, tiny_flags, tiny_config):
  ref, workdir, proc = _reference_and_run_until(tmp_path, tiny_config, tiny_flags,
                                                random.Random().randrange(2, 40, 2))
  time.sleep(random.Random().uniform(0.0, 0.05))  # a random moment: mid-step or mid-save
  proc.kill()
  proc.communicate(timeout=60)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))  # it died mid-run
  err = _rerun_and_compare(ref, workdir, tiny_flags)
  assert "steps/s" in err and "ETA" in err  # the console progress line
  assert ckpt_lib.load_data_state(ref) == ckpt_lib.load_data_state(workdir)
