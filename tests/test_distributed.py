"""moe.distributed: one test per launcher environment (what `plan` recognises and what it passes to
`jax.distributed.initialize`), the one-line errors of half-configured launchers, and real
two-process jobs on localhost started the way SLURM's `srun` and the JAX variables start them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


from conftest import REPO, one_line_error
from moe import distributed
from moe.distributed import Plan, plan

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "node[01-02]",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}


def test_a_plain_process_initializes_nothing():
  assert plan({}) is None
  assert plan({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  assert plan({"OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert plan({"JAX_NUM_PROCESSES": "1"}) is None
  assert plan({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one host


def test_flags():
  got = plan({}, coordinator_address="h0:1234", num_processes=4, process_id=2)
  assert got == Plan("flags", dict(coordinator_address="h0:1234", num_processes=4, process_id=2))
  # Flags win over whatever the environment says.
  assert plan(SLURM_STEP, coordinator_address="h0:1", num_processes=2).environment == "flags"
  with one_line_error("--coordinator_address"):
    plan({}, num_processes=2)
  with one_line_error("--process_id=2", "[0, --num_processes=2)"):
    plan({}, coordinator_address="h0:1", num_processes=2, process_id=2)


def test_jax_variables():
  env = {"JAX_NUM_PROCESSES": "16", "JAX_PROCESS_ID": "5", "JAX_COORDINATOR_ADDRESS": "h0:8476"}
  assert plan(env) == Plan("jax_env", dict(coordinator_address="h0:8476", num_processes=16,
                                           process_id=5))
  with one_line_error("JAX_NUM_PROCESSES=16", "JAX_PROCESS_ID"):
    plan({"JAX_NUM_PROCESSES": "16", "JAX_COORDINATOR_ADDRESS": "h0:1"})
  with one_line_error("JAX_NUM_PROCESSES", "integer"):
    plan({"JAX_NUM_PROCESSES": "many"})
  with one_line_error("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
    plan({"JAX_COORDINATOR_ADDRESS": "h0:1"})


def test_slurm():
  assert plan(SLURM_STEP) == Plan("slurm", dict(cluster_detection_method="slurm"))
  batch_script = {k: v for k, v in SLURM_STEP.items()
                  if k not in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")}
  with one_line_error("SLURM_NTASKS=8", "srun"):
    plan(batch_script)


def test_mpi():
  ompi4 = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:3491"}
  assert plan(ompi4) == Plan("open_mpi", dict(cluster_detection_method="ompi"))
  assert plan({"OMPI_COMM_WORLD_SIZE": "4"}, have_mpi4py=True) == Plan(
      "mpi4py", dict(cluster_detection_method="mpi4py"))
  assert plan({"PMI_SIZE": "2"}, have_mpi4py=True).environment == "mpi4py"  # MPICH
  with one_line_error("mpi4py", "4 processes"):
    plan({"OMPI_COMM_WORLD_SIZE": "4"})


def test_tpu():
  assert plan({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == Plan("tpu_gke", {})
  assert plan({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}).environment == "tpu_gke"
  assert plan({}, tpu_vm=True) == Plan("tpu_vm", {})
  # A SLURM job on TPU hosts is still a SLURM job.
  assert plan(SLURM_STEP, tpu_vm=True).environment == "slurm"


def test_initialize_calls_jax_only_when_planned(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize(env={}) is None
  assert calls == []
  got = distributed.initialize(env=SLURM_STEP)
  assert got.environment == "slurm" and calls == [dict(cluster_detection_method="slurm")]


# ----------------------------------------------------------------------------- real processes

PROBE = """
import jax, sys
sys.path.insert(0, {repo!r})
from moe import distributed
p = distributed.initialize()
x = jax.numpy.ones(()) * (jax.process_index() + 1)
from jax.experimental import multihost_utils
total = multihost_utils.process_allgather(x).sum()
print("RESULT", p.environment, jax.process_count(), jax.process_index(), jax.device_count(),
      float(total), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _port_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("localhost", port))
    except OSError:
      return False
  return True


def _run_two(envs: list[dict]) -> list[list[str]]:
  procs = []
  for extra in envs:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                "JAX_PROCESS_ID", "TPU_"))}
    env.update(extra, JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen([sys.executable, "-c", PROBE.format(repo=REPO)], env=env,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    results.append(next(l for l in out.splitlines() if l.startswith("RESULT")).split()[1:])
  return results


def test_two_processes_from_jax_variables():
  port = _free_port()
  got = _run_two([{"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(i)} for i in range(2)])
  # environment, process count, index, global devices, sum over processes of (index + 1)
  assert got == [["jax_env", "2", "0", "2", "3.0"], ["jax_env", "2", "1", "2", "3.0"]]


def test_two_processes_as_srun_starts_them():
  # What `srun --ntasks=2` on one node sets; JAX derives the coordinator port from the job id.
  job = str(next(j for j in range(1000, 4096) if _port_free(65535 - 2**12 + 1 + j)))
  envs = [{"SLURM_JOB_ID": job, "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost",
           "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}
          for i in range(2)]
  got = _run_two(envs)
  assert got == [["slurm", "2", "0", "2", "3.0"], ["slurm", "2", "1", "2", "3.0"]]


def test_launch_refuses_a_half_configured_launcher_in_one_line(tmp_path):
  env = dict(os.environ, SLURM_NTASKS="4", SLURM_JOB_ID="1")
  for k in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
    env.pop(k, None)
  out = subprocess.run([sys.executable, "launch.py", "--config=configs/default.py",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=120)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: SLURM_NTASKS=4"), out.stderr
  assert not (tmp_path / "run").exists()  # refused before anything was made
