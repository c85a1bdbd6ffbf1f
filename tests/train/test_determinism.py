"""Same inputs, same bits; and the default model is the same function on any mesh.

- The same tiny training run twice, in two `launch.py` processes, the first with an empty and the
  second with the first's (warm) XLA compilation cache: every bit of the final params and of every
  metrics.jsonl record (timing fields aside) is equal.
- `devices.json` (`moe.train.machine`): the machine is recorded, and a resume on another one
  (device count, CPU cores, ...) gives one warning line.
- configs/default.py (fixed routing groups, `moe.group_size`) logs the same losses on 1 device and
  on 8 simulated devices; with `moe.group_size=None` it does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, apply_overrides, load_config_file, read_metrics, write_textdir
from moe.rundir import DEVICES_FILE

TIMING = ("tokens_per_s", "steps_per_s")


def launch(flags: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *flags], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO, **env), capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def cache_entries(path: str) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


# ----------------------------------------------------------------------------- same bits


@pytest.mark.slow
def test_same_run_is_bit_identical_with_a_cold_and_a_warm_compilation_cache(tmp_path, tiny_flags):
  from moe.train import checkpoint as ckpt_lib
  import jax
  cache = str(tmp_path / "jax_cache")
  env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  flags = ["--config=configs/default.py", *tiny_flags({"train.log_every": 1})]
  runs = [str(tmp_path / "cold"), str(tmp_path / "warm")]
  launch([*flags, f"--workdir={runs[0]}"], env)
  cold_cache = cache_entries(cache)
  assert cold_cache, "the first run cached nothing"
  launch([*flags, f"--workdir={runs[1]}"], env)
  assert cache_entries(cache) == cold_cache, "the second run compiled something new"

  metrics = [read_metrics(r, drop_timing=True) for r in runs]
  assert len(metrics[0]) == 6 and any("eval_loss" in r for r in metrics[0])
  assert json.dumps(metrics[0]) == json.dumps(metrics[1])  # every float, printed in full
  params = [ckpt_lib.load_params(r) for r in runs]
  flat = [jax.tree_util.tree_flatten_with_path(p)[0] for p in params]
  assert [k for k, _ in flat[0]] == [k for k, _ in flat[1]] and flat[0]
  for (key, a), (_, b) in zip(*flat):
    assert a.dtype == b.dtype and a.shape == b.shape, key
    assert a.tobytes() == b.tobytes(), key
  machines = [json.load(open(os.path.join(r, DEVICES_FILE)))["machines"] for r in runs]
  assert machines[0] == machines[1] and len(machines[0]) == 1
  assert machines[0][0]["from_step"] == 0 and machines[0][0]["platform"] == "cpu"


# ----------------------------------------------------------------------------- devices.json


def test_devices_json_records_the_machine_and_a_resume_elsewhere_warns(tmp_path):
  from moe.train import machine
  wd = str(tmp_path)
  here = machine.describe()
  assert set(here) == set(machine.FIELDS) and here["host_cpus"] >= 1
  cpu = {"platform": "cpu", "device_kind": "cpu", "device_count": 1, "process_count": 1,
         "host_cpus": 2}

  def saved():
    with open(os.path.join(wd, DEVICES_FILE)) as f:
      return json.load(f)["machines"]

  assert machine.record(wd, None, cpu) is None
  assert saved() == [{"from_step": 0, **cpu}]
  assert machine.record(wd, 100, cpu) is None  # same machine: no warning, no new entry
  assert len(saved()) == 1
  one_core = dict(cpu, host_cpus=1)
  w = machine.record(wd, 200, one_core)
  assert "host_cpus 2 -> 1" in w and "step 200" in w and "\n" not in w
  assert saved()[-1] == {"from_step": 200, **one_core} and len(saved()) == 2
  gpus = dict(one_core, platform="gpu", device_kind="NVIDIA H200", device_count=8)
  w = machine.record(wd, 300, gpus)
  assert "device_count 1 -> 8" in w and "platform cpu -> gpu" in w and "host_cpus" not in w
  # On GPUs the host's CPU count is not part of the machine that computes.
  assert machine.record(wd, 400, dict(gpus, host_cpus=64)) is None
  # A fresh run (no checkpoint) starts the file again.
  assert machine.record(wd, None, cpu) is None and saved() == [{"from_step": 0, **cpu}]


# ----------------------------------------------------------------------------- any mesh

MESH_OVERRIDES = {"train.steps": 2, "train.log_every": 1, "train.eval_every": 2,
                  "train.eval_batches": 1, "train.checkpoint_every": 100,
                  "data.name": "textdir", "data.validation_fraction": 0.25}
COMPARED = ("loss", "cross_entropy", "aux_loss", "eval_loss", "moe/dropped_fraction")


def losses(workdir) -> dict:
  return {r["step"]: {k: r[k] for k in COMPARED if k in r} for r in read_metrics(workdir)}


@pytest.mark.slow
def test_default_config_logs_the_same_losses_on_1_and_8_devices(tmp_path, tfds_dir):
  """configs/default.py as it is (batch 16 x 256, groups of moe.group_size = 512 tokens) on 1
  device and data-parallel on 8 simulated devices (512 tokens each): the same groups, so the same
  drops and losses. To float tolerance (rel 1e-5), not bit-equal: on 8 devices the loss mean and
  the gradient all-reduce add the per-device partial sums in another order. With group_size=None
  one device routes all 4096 tokens as one group: different drops, a loss off by far more."""
  from moe.train import trainer
  text = write_textdir(str(tmp_path / "text"), num_files=200)
  overrides = {**MESH_OVERRIDES, "data.text_dir": text, "data.tfds_data_dir": tfds_dir}
  cfg = apply_overrides(load_config_file("default"), overrides)
  assert cfg.moe.group_size == 512 and cfg.train.batch_size * cfg.data.seq_len == 8 * 512
  trainer.train_and_evaluate(cfg, str(tmp_path / "one_device"))
  one = losses(tmp_path / "one_device")
  assert sorted(one) == [1, 2] and "eval_loss" in one[2] and one[1]["moe/dropped_fraction"] > 0
  none_cfg = apply_overrides(load_config_file("default"), {**overrides, "moe.group_size": None})
  trainer.train_and_evaluate(none_cfg, str(tmp_path / "one_device_one_group"))
  one_group = losses(tmp_path / "one_device_one_group")

  proc = launch(["--config=configs/default.py", f"--workdir={tmp_path / 'eight_devices'}",
                 *[f"--config.{k}={v}" for k, v in overrides.items()]],
                {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()})
  with open(tmp_path / "eight_devices" / "summary.json") as f:
    assert json.load(f)["mesh"]["data"] == 8
  assert "moe.group_size=None" not in proc.stderr  # the default warns on no mesh
  eight = losses(tmp_path / "eight_devices")
  assert sorted(eight) == sorted(one)
  for step, want in one.items():
    for key, value in want.items():
      assert eight[step][key] == pytest.approx(value, rel=1e-5), (step, key)
  gap = abs(one_group[1]["loss"] - eight[1]["loss"]) / eight[1]["loss"]
  assert gap > 1e-4, gap  # the tolerance above would catch a different grouping
  print(f"1 vs 8 devices: step-1 loss {one[1]['loss']!r} vs {eight[1]['loss']!r}; "
        f"group_size=None on 1 device: rel gap {gap:.2e}")
