"""The machine a run computes on, recorded in its workdir, and a warning when a resume changes it.

Identical runs on the same machine are bit-identical (tests/train/test_determinism.py), but the
bits depend on what XLA compiles for: the device kind, how many devices and processes, and on
CPU how many cores XLA:CPU may use (`os.sched_getaffinity`: a cgroup, `taskset`, another machine),
because it splits matrix products and reductions over that many threads, which changes the order
of float additions. So a run resumed on another machine continues correctly but not bit-exactly.

`record(workdir, resume_step)` keeps `workdir/devices.json` (`moe.rundir.DEVICES_FILE`):

  {"machines": [{"from_step": 0, "platform": "cpu", "device_kind": "cpu", "device_count": 1,
                 "process_count": 1, "host_cpus": 2}, ...]}

one entry per stretch of the run on one machine (a resume on the same machine adds none), and
returns the one-line warning the trainer logs when a resume runs on a machine other than the
last entry's. Process 0 writes it, through `moe.rundir` (the workdir may be remote).
"""

from __future__ import annotations

import os

import jax

from moe.rundir import DEVICES_FILE, join, read_json, write_json_atomic

# The fields whose change changes the bits (host_cpus only on the CPU platform).
FIELDS = ("platform", "device_kind", "device_count", "process_count", "host_cpus")


def host_cpus() -> int:
  """The CPU cores this process may run on (what XLA:CPU sizes its thread pool by)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return os.cpu_count() or 1


def describe() -> dict:
  """This process's view of the machine, FIELDS in order."""
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count(),
          "host_cpus": host_cpus()}


def differences(before: dict, now: dict) -> list[str]:
  """'field a -> b' for each FIELDS entry that differs (host_cpus only when both are CPU runs)."""
  out = []
  for key in FIELDS:
    if key == "host_cpus" and not (before.get("platform") == now.get("platform") == "cpu"):
      continue
    if before.get(key) != now.get(key):
      out.append(f"{key} {before.get(key)} -> {now.get(key)}")
  return out


def record(workdir: str, resume_step: int | None, now: dict | None = None) -> str | None:
  """Adds this machine to `workdir`/devices.json when it differs from the last entry (or starts
  the file on a fresh run); returns the warning line for a resume on another machine, else None.

  `now` defaults to `describe()`. Only process 0 writes; every process returns the same line."""
  now = describe() if now is None else now
  path = join(workdir, DEVICES_FILE)
  saved = read_json(path) if resume_step is not None else None
  machines = saved.get("machines", []) if isinstance(saved, dict) else []
  last = machines[-1] if machines and isinstance(machines[-1], dict) else None
  changed = differences(last, now) if last is not None else []
  if last is None or changed:
    machines.append({"from_step": resume_step or 0, **now})
    if jax.process_index() == 0:
      write_json_atomic(path, {"machines": machines})
  if not changed:
    return None
  return (f"resumed at step {resume_step} on another machine than step {last.get('from_step')} "
          f"on ({', '.join(changed)}): training continues, but not bit-identically to a run "
          f"that stayed on one machine (README.md, Status: determinism)")
