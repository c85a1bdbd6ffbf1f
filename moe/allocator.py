"""The process's malloc told to keep freed memory: the one allocator setting of training runs and
of the benchmarks (standard library only; nothing here imports JAX).

On XLA:CPU every training step allocates its large buffers afresh (the [E, D, F] weight
gradients, activations). Under glibc's defaults each buffer over the mmap threshold is mmap'ed,
page-faulted in and unmapped again every step, which costs more than the matmuls at many
experts. `apply()` sets, through `mallopt` at run time:

  M_ARENA_MAX = 1             one arena for every thread: XLA's worker threads allocate the big
                              buffers, and in a per-thread arena glibc (2.36) mmaps any block over
                              its 64 MiB heap size whatever M_MMAP_MAX says;
  M_MMAP_MAX = 0              no mmap for large blocks: they come from the heap and are reused;
  M_TRIM_THRESHOLD = -1       never give the top of the heap back to the OS ("-1 disables
                              trimming completely", mallopt(3));
  M_TOP_PAD = 1000000000      grow the heap by up to 1 GB more than asked (fewer brk calls).

These are what the environment variables MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0,
MALLOC_TRIM_THRESHOLD_=<huge>, MALLOC_TOP_PAD_=1000000000 give a process started with them,
without having to restart it (M_ARENA_MAX holds for threads started later: JAX's). Measured on
the MoE layer at E = 256 (T = 8192, D = 256, F = 1024, fwd+bwd): about 280k page faults per step
(~1.1 GB touched afresh) under the defaults and under the three variables without the arena
limit, 0 after the first steps with it; medians of 7 interleaved fresh processes (shared
machine, noisy): MoE 686 ms -> 563 ms, the dense SwiGLU of width K*F 335 ms -> 224 ms (so the
MoE / dense ratio rises, 2.05 -> 2.55: the dense FFN gains more), system time per step 10x lower.
The cost: the process's resident memory stays at its
peak (freed memory is reused by the process, not returned to the OS).

`launch.py` calls `apply()` first thing when run as a program, before JAX is imported, and so do
the benchmark scripts (experiments/); a process that imports `launch` as a module (the tests)
keeps its defaults. glibc only: elsewhere (macOS, musl, a malloc replaced through LD_PRELOAD
such as tcmalloc or jemalloc) it changes nothing and `status()` says why. Opt out with the
environment variable `MOE_SYSTEM_MALLOC=1` (glibc's defaults are kept). The setting is per
process: child processes (data workers, the benchmark's PyTorch rows) do not inherit it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import sys

OPT_OUT_ENV = "MOE_SYSTEM_MALLOC"

# (name, glibc's mallopt parameter number from <malloc.h>, value)
SETTINGS = (("M_ARENA_MAX", -8, 1),
            ("M_MMAP_MAX", -4, 0),
            ("M_TRIM_THRESHOLD", -1, -1),
            ("M_TOP_PAD", -2, 1_000_000_000))


@dataclasses.dataclass(frozen=True)
class Status:
  """What `apply()` did: `applied` is True when every mallopt call succeeded; `detail` says
  what was set or why nothing was; `jax_imported_first` is True when JAX was already imported
  (its start-up allocations were then made under the defaults)."""
  applied: bool
  detail: str
  jax_imported_first: bool = False

  def describe(self) -> str:
    """One line for logs and benchmark headers."""
    late = " (applied after JAX was imported)" if self.applied and self.jax_imported_first else ""
    return self.detail + late


_status: Status | None = None


def _glibc():
  """(libc handle, 'glibc X.Y') of this process, or (None, why not)."""
  preload = os.environ.get("LD_PRELOAD", "")
  if any(name in preload for name in ("malloc", "jemalloc", "tcmalloc", "mimalloc")):
    return None, f"malloc replaced through LD_PRELOAD={preload}: left as it is"
  try:
    libc = ctypes.CDLL(None)
    version = libc.gnu_get_libc_version
  except (AttributeError, OSError, TypeError):
    return None, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): no change"
  version.restype = ctypes.c_char_p
  return libc, f"glibc {version().decode()}"


def apply(libc=None, environ=None) -> Status:
  """Sets the malloc parameters of `SETTINGS` once per process and returns the `Status`; later
  calls return the first call's status. `libc` (tests) is an object with a `mallopt(param,
  value) -> int` method used instead of the process's glibc; `environ` defaults to os.environ."""
  global _status
  if _status is not None:
    return _status
  environ = os.environ if environ is None else environ
  jax_first = "jax" in sys.modules
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    _status = Status(False, f"system malloc defaults ({OPT_OUT_ENV}={environ[OPT_OUT_ENV]})",
                     jax_first)
    return _status
  name = "libc given"
  if libc is None:
    libc, name = _glibc()
    if libc is None:
      _status = Status(False, name, jax_first)
      return _status
  failed = [n for n, param, value in SETTINGS if libc.mallopt(param, value) != 1]
  settings = " ".join(f"{n}={value}" for n, _, value in SETTINGS)
  if failed:
    _status = Status(False, f"{name}: mallopt refused {', '.join(failed)} (of {settings})",
                     jax_first)
  else:
    _status = Status(True, f"{name} mallopt {settings} (freed memory kept; "
                     f"{OPT_OUT_ENV}=1 keeps the defaults)", jax_first)
  return _status


def status() -> Status | None:
  """The status of this process's `apply()` call, or None before it."""
  return _status


def _reset_for_tests() -> None:
  global _status
  _status = None
