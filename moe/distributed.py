"""Several processes, one job: which launcher started this process, and what
`jax.distributed.initialize` needs to hear about it.

`plan(env, ...)` reads only its arguments (the command-line flags and an environment mapping)
and returns a `Plan`: the environment it recognised and the keyword arguments for
`jax.distributed.initialize`, or None when this process runs alone. `initialize(...)` applies
it. The rules, first match wins:

| environment | recognised by | what is passed to `jax.distributed.initialize` |
| --- | --- | --- |
| flags | `--num_processes > 1` or `--coordinator_address` | the three flags |
| JAX variables | `JAX_NUM_PROCESSES` (with `JAX_COORDINATOR_ADDRESS`, `JAX_PROCESS_ID`) | those three values |
| SLURM (`srun`) | `SLURM_NTASKS > 1` and the step variables `srun` sets | `cluster_detection_method="slurm"` (JAX reads the node list, task id and local id) |
| Open MPI 4 (`mpirun`) | `OMPI_COMM_WORLD_SIZE > 1` and `OMPI_MCA_orte_hnp_uri` | `cluster_detection_method="ompi"` |
| MPI without ORTE (Open MPI 5, MPICH) | `OMPI_COMM_WORLD_SIZE` / `PMI_SIZE` > 1 and `mpi4py` installed | `cluster_detection_method="mpi4py"` |
| TPU on GKE | `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` listing several hosts | nothing: JAX finds the workers itself |
| Cloud TPU VM | JAX found TPU chips and libtpu at import | nothing: JAX asks the VM's metadata server for the workers (a one-host VM becomes a job of one process) |

A launcher that says "several processes" but lacks what JAX needs is a one-line `ConfigError`
rather than a process that waits for peers forever: `SLURM_NTASKS > 1` without `srun`'s step
variables (the batch script itself, not `srun`, started launch.py); an MPI world without ORTE
and without `mpi4py`; `JAX_NUM_PROCESSES > 1` without the address or the id.

docs/distributed.md has a ready command per environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Mapping

from moe.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` does: `environment` names the launcher, `kwargs` go to
  `jax.distributed.initialize`."""

  environment: str
  kwargs: dict


def _count(env: Mapping[str, str], name: str) -> int | None:
  """The integer in `env[name]`; None when unset; ConfigError when it is not an integer."""
  value = env.get(name, "").strip()
  if not value:
    return None
  if not value.lstrip("-").isdigit():
    raise ConfigError(f"environment variable {name}={value!r} must be an integer")
  return int(value)


def _several_hosts(value: str | None) -> bool:
  return bool(value) and len([h for h in value.split(",") if h.strip()]) > 1


def plan(env: Mapping[str, str], *, coordinator_address: str | None = None,
         num_processes: int = 1, process_id: int = 0, tpu_vm: bool = False,
         have_mpi4py: bool = False) -> Plan | None:
  """The launcher `env` (and the flags) describe, per the table in the module docstring; None
  for a single process. `tpu_vm`: JAX found a Cloud TPU VM; `have_mpi4py`: mpi4py imports."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  if num_processes > 1 or coordinator_address:
    if not coordinator_address:
      raise ConfigError("--num_processes > 1 needs --coordinator_address=host:port")
    return Plan("flags", dict(coordinator_address=coordinator_address,
                              num_processes=num_processes, process_id=process_id))

  n = _count(env, "JAX_NUM_PROCESSES")
  if n is not None:
    if n < 1:
      raise ConfigError(f"JAX_NUM_PROCESSES={n} must be >= 1")
    if n > 1:
      address, pid = env.get("JAX_COORDINATOR_ADDRESS"), _count(env, "JAX_PROCESS_ID")
      if not address or pid is None or not 0 <= pid < n:
        raise ConfigError(f"JAX_NUM_PROCESSES={n} needs JAX_COORDINATOR_ADDRESS=host:port and "
                          f"JAX_PROCESS_ID in [0, {n}) in every process")
      return Plan("jax_env", dict(coordinator_address=address, num_processes=n, process_id=pid))

  tasks = _count(env, "SLURM_NTASKS")
  if tasks is not None and tasks > 1 and "SLURM_JOB_ID" in env:
    step = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    missing = [v for v in step if v not in env]
    if missing:
      raise ConfigError(f"SLURM_NTASKS={tasks} but {', '.join(missing)} unset: start launch.py "
                        "with `srun` inside the job (see docs/distributed.md), not directly")
    return Plan("slurm", dict(cluster_detection_method="slurm"))

  world = _count(env, "OMPI_COMM_WORLD_SIZE") or _count(env, "PMI_SIZE")
  if world is not None and world > 1:
    if "OMPI_MCA_orte_hnp_uri" in env:
      return Plan("open_mpi", dict(cluster_detection_method="ompi"))
    if have_mpi4py:
      return Plan("mpi4py", dict(cluster_detection_method="mpi4py"))
    raise ConfigError(f"an MPI world of {world} processes without Open MPI 4's ORTE: install "
                      "mpi4py, or pass --coordinator_address/--num_processes/--process_id")

  if _several_hosts(env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")):
    return Plan("tpu_gke", {})
  if tpu_vm:
    return Plan("tpu_vm", {})
  if env.get("JAX_COORDINATOR_ADDRESS"):
    raise ConfigError("JAX_COORDINATOR_ADDRESS is set but no JAX_NUM_PROCESSES / JAX_PROCESS_ID "
                      "and no cluster launcher was found: set both, or unset it")
  return None


def _on_tpu_vm() -> bool:
  """Whether `import jax` found TPU chips and libtpu (JAX's own Cloud TPU check)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(*, coordinator_address: str | None = None, num_processes: int = 1,
               process_id: int = 0, env: Mapping[str, str] | None = None) -> Plan | None:
  """`plan` for this process's environment, then `jax.distributed.initialize` if it asks for
  processes. Returns the plan (None: a single process, nothing was called)."""
  import jax  # pylint: disable=g-import-not-at-top

  p = plan(os.environ if env is None else env, coordinator_address=coordinator_address,
           num_processes=num_processes, process_id=process_id, tpu_vm=_on_tpu_vm(),
           have_mpi4py=importlib.util.find_spec("mpi4py") is not None)
  if p is not None:
    jax.distributed.initialize(**p.kwargs)
  return p
