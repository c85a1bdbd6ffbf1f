"""Damaged checkpoints, the workdir lock, a full disk, signals at any moment, out of memory.

What each simulation covers is said in its test's docstring.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import REPO, one_line_error, read_metrics
from moe.errors import ConfigError
from moe.train import checkpoint as ckpt_lib
from moe.train import lock as lock_lib
from moe.train import trainer as train
from test_checkpoint import _assert_same, _state


# ----------------------------------------------------------------------------- damage


def _largest_array_file(step_dir) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep]
  return max(files, key=os.path.getsize)


def _damage(step_dir, kind: str) -> None:
  if kind in ("truncated", "deleted", "garbage", "bit_flipped"):
    path = _largest_array_file(step_dir)
  elif kind == "garbage_metadata":
    path = os.path.join(step_dir, "state", "_METADATA")
  else:
    path = os.path.join(step_dir, "data", "process_0-of-1.json")
  with open(path, "rb") as f:
    data = bytearray(f.read())
  if kind == "deleted":
    os.remove(path)
    return
  if kind == "truncated":
    data = data[:len(data) // 2]
  elif kind == "bit_flipped":
    data[len(data) // 2] ^= 0x10  # one bit of one byte
  else:  # garbage of the same size
    data = bytearray(b"\x07garbage!" * (len(data) // 9 + 1))[:len(data)]
  with open(path, "wb") as f:
    f.write(data)


KINDS = ["truncated", "deleted", "garbage", "bit_flipped", "garbage_metadata", "garbage_data"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, kind, caplog):
  directory = tmp_path / "checkpoints"
  c = ckpt_lib.Checkpointer(directory, keep=3)
  for step in (1, 2):
    c.save(step, _state(step), {"position": step}, {"format": 1, "window": []})
  c.close()
  assert os.path.exists(directory / "2" / ckpt_lib.MANIFEST)
  _damage(str(directory / "2"), kind)
  c = ckpt_lib.Checkpointer(directory, keep=3)
  with caplog.at_level("WARNING"):
    step, state, data_state, log_state = c.restore_newest(ckpt_lib.abstract_like(_state(1)))
  assert step == 1 and data_state == {"position": 1} and log_state == {"format": 1, "window": []}
  _assert_same(_state(1), state)
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert c.all_steps() == [1] and os.path.isdir(directory / "damaged_2")
  c.close()


def test_no_intact_checkpoint_left_is_one_line(tmp_path):
  directory = tmp_path / "checkpoints"
  c = ckpt_lib.Checkpointer(directory)
  c.save(1, _state(1), {})
  c.close()
  _damage(str(directory / "1"), "bit_flipped")
  c = ckpt_lib.Checkpointer(directory)
  with one_line_error("no intact checkpoint left", "damaged: [1]", exc=ckpt_lib.CheckpointError):
    c.restore_newest(ckpt_lib.abstract_like(_state(1)))
  c.close()


def test_extra_checkpoints_after_a_crash_are_pruned(tmp_path):
  """A kill between a save and Orbax's deletion of the oldest step leaves keep + 1 steps."""
  directory = tmp_path / "checkpoints"
  c = ckpt_lib.Checkpointer(directory)  # keep everything: what the crash left
  for step in (1, 2, 3):
    c.save(step, _state(step), {})
  c.close()
  c = ckpt_lib.Checkpointer(directory, keep=2)
  assert c.restore_newest(ckpt_lib.abstract_like(_state(1)))[0] == 3
  c.prune()
  assert c.all_steps() == [2, 3]
  c.close()


def test_trainer_resumes_from_the_previous_checkpoint_exactly(tiny_config, tmp_path):
  """End to end: the newest checkpoint of a finished run is bit-flipped; the same command falls
  back to the previous one, retrains the lost steps and ends with the same bits and records."""
  over = {"train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 2}
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(over), ref)
  train.train_and_evaluate(tiny_config(over), run)
  _damage(os.path.join(run, "checkpoints", "6"), "bit_flipped")
  summary = train.train_and_evaluate(tiny_config(over), run)
  assert summary["status"] == "completed" and summary["resumed_from_step"] == 3
  a, b = ckpt_lib.load_params(ref), ckpt_lib.load_params(run)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y)
  assert read_metrics(ref, drop_timing=True) == read_metrics(run, drop_timing=True)


# ----------------------------------------------------------------------------- lock


def test_second_run_on_a_workdir_is_refused(tiny_config, tmp_path):
  with lock_lib.workdir_lock(str(tmp_path)):
    with one_line_error("is in use by another training run", str(os.getpid())):
      train.train_and_evaluate(tiny_config({"train.steps": 2}), str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  code = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {REPO!r})
      from moe.train import lock
      with lock.workdir_lock({str(tmp_path)!r}):
        print("locked", flush=True)
        time.sleep(60)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  with pytest.raises(ConfigError, match=f"process {proc.pid} holds"):
    with lock_lib.workdir_lock(str(tmp_path)):
      pass
  proc.kill()
  proc.wait(timeout=30)
  with lock_lib.workdir_lock(str(tmp_path)):  # the OS released it with the process
    pass


# ----------------------------------------------------------------------------- processes


def _launch(workdir, flags, **env):
  return subprocess.Popen([sys.executable, os.path.join(REPO, "launch.py"),
                           "--config=configs/default.py", f"--workdir={workdir}", *flags],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_launch_with(tmp_path, workdir, flags, patch: str, timeout=300):
  """launch.py in a subprocess, after `patch` (Python source) ran in that process."""
  script = tmp_path / "patched_launch.py"
  script.write_text(textwrap.dedent(f"""
      import runpy, sys
      sys.path.insert(0, {REPO!r})
  """) + textwrap.dedent(patch) + textwrap.dedent(f"""
      sys.argv = ["launch.py", "--config=configs/default.py", "--workdir={workdir}", *{flags!r}]
      runpy.run_path("launch.py", run_name="__main__")
  """))
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line_and_recoverable(tmp_path, tiny_flags, tiny_config):
  """Simulation: from the save of step 6 on, the process may write no file beyond 8 KiB
  (RLIMIT_FSIZE, SIGXFSZ ignored), so TensorStore's and the JSON writers' write() calls fail
  with EFBIG: the same failure path as ENOSPC (a write that the file system refuses), not a
  real full file system. The previous checkpoint stays intact and the relaunch completes."""
  over = {"train.steps": 6, "train.checkpoint_every": 3}
  workdir = str(tmp_path / "run")
  proc = _run_launch_with(tmp_path, workdir, tiny_flags(over), """
      import resource, signal
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      from moe.train import checkpoint as ck
      _save = ck.Checkpointer.save
      def save(self, step, *args, **kw):
        if step == 6:
          self.wait()  # step 3 is on disk: only step 6's writes fail
          resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        return _save(self, step, *args, **kw)
      ck.Checkpointer.save = save
  """)
  assert proc.returncode == 2, proc.stderr[-3000:]
  # Orbax's background threads also log the failure (absl ERROR lines, no tracebacks) as
  # they wind down, so the error is the one line of launch.py's own, not the last line.
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: saving checkpoint 6 in ") and "step 3) is intact" in lines[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # launch.ignore_closed_event_loops
  summary = train.train_and_evaluate(tiny_config(over), workdir)
  assert summary["status"] == "completed" and summary["resumed_from_step"] == 3
  assert [r["step"] for r in read_metrics(workdir)] == [2, 3, 4, 6]  # eval at 3, logs at 2, 4, 6


@pytest.mark.slow
def test_out_of_memory_is_one_line_and_the_process_exits(tmp_path, tiny_flags):
  """Simulation: the first training step raises XLA's RESOURCE_EXHAUSTED error (as a real
  allocation failure does, `jax.errors.JaxRuntimeError`) after the data iterator has produced
  a batch; provoking a real one cheaply on CPU is not reliable (RLIMIT_AS makes XLA abort).
  Covers: one line naming the batch and model sizes, exit code 2, and a prompt exit: grain's
  prefetch threads (non-daemon, joined at interpreter exit) would first produce every batch
  already queued unless the iterator is closed."""
  proc = _run_launch_with(tmp_path, str(tmp_path / "run"), tiny_flags(), """
      import time
      import jax
      from moe.data import pipeline
      from moe.train import trainer
      _get = pipeline._ProcessBlocks.__getitem__
      def slow_get(self, index):  # a row in 2 s: a batch of 4 takes 8 s
        time.sleep(2.0)
        return _get(self, index)
      pipeline._ProcessBlocks.__getitem__ = slow_get
      def run(self, state, stop_at_step, guard):
        next(self.s.data.train_iter)
        print("raised at", time.time(), file=sys.stderr, flush=True)
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.")
      from moe.train import loop
      loop.Loop.run = run
  """, timeout=240)
  ended = time.time()
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _last_line(proc.stderr)
  assert line.startswith("error: out of memory with train.batch_size=4, data.seq_len=16 and "), line
  assert "moe.num_experts=4" in line and "Traceback" not in proc.stderr
  raised = float(proc.stderr.split("raised at ")[1].split()[0])
  assert ended - raised < 20, ended - raised  # measured: 9 s; without closing it, 26 s


@pytest.mark.slow
def test_sigterm_while_preparing_then_ctrl_c_while_training(tmp_path, tiny_flags):
  """SIGTERM as soon as the run has created its workdir (data preparation / compilation):
  exit 0, "preempted" at step 0 with a checkpoint of the initial state. Then Ctrl-C (SIGINT)
  mid-training: exit 0,
  "preempted", a checkpoint at the step it stopped, no traceback."""
  workdir = str(tmp_path / "run")
  flags = tiny_flags({"train.steps": 400, "train.checkpoint_every": 1000})
  proc = _launch(workdir, flags, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cold"))  # compiles
  t0 = time.time()
  while not os.path.isdir(workdir):
    assert proc.poll() is None and time.time() - t0 < 200, proc.stderr.read()[-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "preempted" and summary["step"] == 0, summary
  assert ckpt_lib.resolve(workdir)[1] == 0

  proc = _launch(workdir, flags)
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while not (os.path.exists(path) and os.path.getsize(path) > 0):
    assert proc.poll() is None and time.time() - t0 < 200, proc.stderr.read()[-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "preempted" and 2 <= summary["step"] < 400, summary
  assert ckpt_lib.resolve(workdir)[1] == summary["step"]


def test_sigterm_during_compilation_stops_before_the_first_step(tiny_config, tmp_path,
                                                                monkeypatch):
  """In-process: SIGTERM arrives while the train step is being traced and compiled; the run
  compiles, takes no step and ends "preempted" at step 0 (a checkpoint of the initial state)."""
  from moe.train import step as step_lib
  make = step_lib.make_train_step

  def make_and_signal(*args, **kw):
    fn = make(*args, **kw)

    def traced(*a):
      os.kill(os.getpid(), signal.SIGTERM)
      return fn(*a)
    return traced

  monkeypatch.setattr(step_lib, "make_train_step", make_and_signal)
  before = signal.getsignal(signal.SIGTERM)
  summary = train.train_and_evaluate(tiny_config({"train.steps": 4}), str(tmp_path))
  assert summary["status"] == "preempted" and summary["step"] == 0, summary
  assert signal.getsignal(signal.SIGTERM) == before
  assert ckpt_lib.resolve(str(tmp_path))[1] == 0


def test_metrics_truncation_drops_later_and_duplicated_records(tmp_path):
  """What two runs on one workdir left before the lock existed: scrambled, duplicated steps."""
  from moe.train import metrics as metrics_lib
  path = tmp_path / "metrics.jsonl"
  steps = [2, 4, 6, 2, 8, 4, 6, 10]
  path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps)
                  + '{"step": 12, "lo')  # and a line cut by a kill
  log = metrics_lib.MetricsLog(str(tmp_path), total_steps=12, primary=True)
  log.truncate_after(8)
  log.close()
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4, 6, 8]


def test_launch_drops_only_the_failed_save_noise():
  """The two filters behind the full-disk test's "no Traceback": asyncio's report of an Orbax
  write nobody awaits any more (a Task naming an Orbax coroutine, or a Future whose exception
  was raised in Orbax), and TensorStore's "Event loop is closed" unraisables; other
  records and other unraisable exceptions pass."""
  import logging as std_logging
  import launch

  def record(name, msg, path="/x/y.py", level=std_logging.ERROR):
    return std_logging.LogRecord(name, level, path, 1, msg, None, None)

  quiet = launch.QuietLibraries()
  orbax_task = ("Task exception was never retrieved\nfuture: <Task finished coro=<write_fragment() "
                "defined at /venv/site-packages/orbax/checkpoint/_src/serialization.py:188>>")
  assert not quiet.filter(record("asyncio", orbax_task))
  assert quiet.filter(record("asyncio", "Task exception was never retrieved\nfuture: <Task mine>"))
  assert quiet.filter(record("moe", "error in /orbax/ path named by our own code"))

  def raised_in(filename):  # an exception whose traceback passes through `filename`
    try:
      exec(compile("raise ValueError('OUT_OF_RANGE: Error writing')", filename, "exec"))
    except ValueError:
      return sys.exc_info()

  orbax_future = record("asyncio", "Future exception was never retrieved\nfuture: <Future "
                        "finished exception=ValueError('OUT_OF_RANGE: Error writing')>")
  orbax_future.exc_info = raised_in("/venv/site-packages/orbax/checkpoint/_src/serialization.py")
  assert not quiet.filter(orbax_future)
  other_future = record("asyncio", "Future exception was never retrieved")
  other_future.exc_info = raised_in("/work/mine.py")
  assert quiet.filter(other_future)

  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: seen.append(u.exc_value)
  try:
    launch.ignore_closed_event_loops()
    closed, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    for exc in (closed, other):
      sys.unraisablehook(type("U", (), {"exc_value": exc})())
  finally:
    sys.unraisablehook = previous
  assert seen == [other]
