"""Several processes, one training job: `launch.py` started once per process on localhost
(`--coordinator_address/--num_processes/--process_id`, `jax.distributed.initialize` with CPU
collectives), the code path a TPU pod or a GPU cluster takes.

2 processes x 4 simulated CPU devices train the tiny MoE on an expert-parallel mesh and log the
losses of 1 process x 8 devices; only process 0 writes metrics; every process writes its part of
each checkpoint; a checkpoint of the two-process run resumes in a one-process run on another mesh
and continues with the uninterrupted losses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import read_metrics
from test_expert_parallel import TRAIN_OVERRIDES, read_losses

from conftest import REPO  # noqa: E402
STEPS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def flags(tiny_flags, workdir, mesh: dict) -> list[str]:
  overrides = dict(TRAIN_OVERRIDES, **{"train.steps": STEPS, "train.checkpoint_every": 2,
                                       "train.keep_checkpoints": 3})
  overrides.update({f"mesh.{k}": v for k, v in mesh.items()})
  return ["launch.py", "--config=configs/default.py", f"--workdir={workdir}",
          *tiny_flags(overrides)]


def launch(args: list[str], devices: int, num_processes: int = 1, timeout: int = 900):
  """Starts `num_processes` copies of launch.py (each with `devices` CPU devices); waits."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  extra = [[]]
  if num_processes > 1:
    port = free_port()
    extra = [[f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"] for i in range(num_processes)]
  procs = [subprocess.Popen([sys.executable, *args, *e], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for e in extra]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def assert_same(got, want, what):
  assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
  for step, rec in want.items():
    for key, value in rec.items():
      assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (what, step, key)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_on_another_mesh(tiny_flags, tmp_path):
  # 1 process x 8 devices, expert-parallel mesh (data 2, expert 4).
  one = tmp_path / "one_process"
  launch(flags(tiny_flags, one, {"data": 2, "expert": 4}), devices=8)
  want = read_losses(one)
  assert sorted(want) == list(range(1, STEPS + 1)) and "eval_loss" in want[STEPS]
  assert want[1]["moe/dropped_fraction"] > 0

  # 2 processes x 4 devices, the same mesh; the data axis spread over the processes
  # (mesh.dcn_data=2: each process holds one half of the data axis, all 4 expert shards).
  two = tmp_path / "two_processes"
  launch(flags(tiny_flags, two, {"data": 2, "expert": 4, "dcn_data": 2}), devices=4,
         num_processes=2)
  assert_same(read_losses(two), want, "2 processes x 4 devices")
  # Only process 0 writes metrics: one record per step.
  assert [r["step"] for r in read_metrics(two)] == list(range(1, STEPS + 1))
  with open(two / "summary.json") as f:
    summary = json.load(f)
  assert summary["processes"] == 2 and summary["devices"] == 8 and summary["status"] == "completed"
  assert summary["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
  # Checkpoints written by both processes together: each process's data position.
  for step in (2, 4):
    data_dir = two / "checkpoints" / str(step) / "data"
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".json"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"], names

  # Resume step 2 of the two-process run in one process on another mesh (data 8).
  resumed = tmp_path / "resumed"
  os.makedirs(resumed / "checkpoints")
  shutil.copytree(two / "checkpoints" / "2", resumed / "checkpoints" / "2")
  launch(flags(tiny_flags, resumed, {"data": 8}), devices=8)
  got = read_losses(resumed)
  assert sorted(got) == list(range(3, STEPS + 1)), sorted(got)
  assert_same(got, {s: want[s] for s in got}, "resumed on (8,1,1,1)")
  with open(resumed / "summary.json") as f:
    assert json.load(f)["resumed_from_step"] == 2
