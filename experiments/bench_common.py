"""What the benchmark scripts share: the repository root, rewriting one section of BENCHMARKS.md,
the machine / versions / load / command metadata each section starts with, the process's
allocator setting (`apply_allocator`), and interleaved timing (`race`, `summary`).

Standard library only, and nothing here imports JAX at module level: bench_sharding.py must set
XLA_FLAGS before JAX starts, and the malloc setting must be made before JAX allocates.
The scripts run as `python experiments/<script>.py`, so this folder is on sys.path.
"""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def apply_allocator() -> str:
  """The training run's malloc setting for this process (`moe.allocator`, as launch.py applies
  it; call before importing JAX); returns its one-line description for the section header."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from moe import allocator  # pylint: disable=import-outside-toplevel
  return allocator.apply().describe()


def timed(fn):
  """(wall seconds, CPU seconds of this process) of one call, results ready."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def race(fns: dict, repeats: int, warmup: int = 1):
  """Runs the callables in turn `repeats` times after `warmup` rounds; {name: [(wall, cpu)]}."""
  for _ in range(warmup):
    for f in fns.values():
      f()
  out = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      out[name].append(timed(f))
  return out


def summary(moe_times, dense_times):
  """Median wall ms of each side, median per-pair wall ratio and CPU-time ratio."""
  wall_ratio = statistics.median(m[0] / d[0] for m, d in zip(moe_times, dense_times))
  cpu_ratio = statistics.median(m[1] / d[1] for m, d in zip(moe_times, dense_times))
  return {"moe_ms": 1e3 * statistics.median(m[0] for m in moe_times),
          "dense_ms": 1e3 * statistics.median(d[0] for d in dense_times),
          "ratio": wall_ratio, "cpu_ratio": cpu_ratio}


def write_section(path: str, heading: str, text: str) -> None:
  """Writes `text` (which starts with the line `heading`) as that section of the markdown file.

  A section runs from the line equal to `heading` up to the next line starting with '## ' (or the
  end of the file); it is replaced, or appended if absent (a missing file starts as
  '# Benchmarks'). One newline rule everywhere: the section ends with exactly one newline and is
  separated from what follows (or precedes, when appended) by exactly one blank line. Nothing
  outside the section changes.
  """
  body = text.rstrip("\n") + "\n"
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  else:
    old = "# Benchmarks\n"
  lines = old.splitlines(keepends=True)
  start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
  if start is None:
    new = old.rstrip("\n") + "\n\n" + body
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    tail = "".join(lines[end:])
    new = "".join(lines[:start]) + body + ("\n" + tail if tail else "")
  with open(path, "w") as f:
    f.write(new)


def machine() -> str:
  """'N CPUs (model name), System arch'."""
  model = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.machine()}"


def versions(extra=()) -> str:
  """'jax X, flax Y, Python Z', then '<name> <version>' of each module named in `extra`."""
  import flax
  import jax
  parts = [f"jax {jax.__version__}", f"flax {flax.__version__}",
           f"Python {platform.python_version()}"]
  for name in extra:
    parts.append(f"{name} {importlib.import_module(name).__version__}")
  return ", ".join(parts)


def loadavg() -> str:
  """The 1-minute load average, two decimals ('?' where the OS has none)."""
  try:
    return f"{os.getloadavg()[0]:.2f}"
  except (AttributeError, OSError):
    return "?"


def command_line() -> str:
  """How this process was started: 'python <script relative to ROOT> <args...>'."""
  script = os.path.abspath(sys.argv[0])
  rel = os.path.relpath(script, ROOT)
  if rel.startswith(os.pardir):
    rel = script
  return shlex.join(["python", rel] + sys.argv[1:])
