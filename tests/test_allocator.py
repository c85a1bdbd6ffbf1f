"""moe.allocator: the malloc setting of training runs and benchmarks (mallopt through a fake libc,
the opt-out, non-glibc systems), its effect on the real glibc, and that launch.py applies it
before JAX is imported."""

from __future__ import annotations

import ast
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from moe import allocator

# M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD (glibc's <malloc.h>)
EXPECTED_CALLS = [(-8, 1), (-4, 0), (-1, -1), (-2, 1_000_000_000)]


class FakeLibc:
  """Records mallopt(param, value) calls; returns `result` (glibc: 1 = success, 0 = error)."""

  def __init__(self, result=1):
    self.calls, self.result = [], result

  def mallopt(self, param, value):
    self.calls.append((param, value))
    return self.result


@pytest.fixture(autouse=True)
def fresh_status():
  allocator._reset_for_tests()
  yield
  allocator._reset_for_tests()


def test_mallopt_called_with_the_settings():
  libc = FakeLibc()
  status = allocator.apply(libc=libc, environ={})
  assert libc.calls == EXPECTED_CALLS
  assert status.applied and allocator.status() is status
  assert ("M_ARENA_MAX=1 M_MMAP_MAX=0 M_TRIM_THRESHOLD=-1 M_TOP_PAD=1000000000"
          in status.describe())


def test_applied_once_per_process():
  first, second = FakeLibc(), FakeLibc()
  status = allocator.apply(libc=first, environ={})
  assert allocator.apply(libc=second, environ={}) is status
  assert second.calls == [] and len(first.calls) == len(EXPECTED_CALLS)


@pytest.mark.parametrize("value,opted_out", [("1", True), ("yes", True), ("0", False),
                                             ("", False)])
def test_opt_out_variable(value, opted_out):
  libc = FakeLibc()
  status = allocator.apply(libc=libc, environ={allocator.OPT_OUT_ENV: value})
  assert status.applied is not opted_out
  assert libc.calls == ([] if opted_out else EXPECTED_CALLS)
  if opted_out:
    assert f"{allocator.OPT_OUT_ENV}={value}" in status.describe()


def test_refused_setting_is_reported():
  status = allocator.apply(libc=FakeLibc(result=0), environ={})
  assert not status.applied
  assert ("mallopt refused M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD"
          in status.describe())


def test_not_glibc_changes_nothing(monkeypatch):
  class Musl:  # a libc without gnu_get_libc_version (musl, macOS)
    def mallopt(self, *a):
      raise AssertionError("mallopt called on a libc that is not glibc")

  monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Musl())
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  status = allocator.apply(environ={})
  assert not status.applied and "not glibc" in status.describe()


def test_preloaded_malloc_left_alone(monkeypatch):
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc.so.4")
  monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: FakeLibc())
  status = allocator.apply(environ={})
  assert not status.applied and "LD_PRELOAD" in status.describe()


def _python(code: str, env_extra=None, args=()):
  env = {k: v for k, v in os.environ.items() if k != allocator.OPT_OUT_ENV}
  env.update(PYTHONPATH=REPO, **(env_extra or {}))
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


MMAPPED_BLOCKS = """
    import ctypes, json, sys, threading
    from moe import allocator
    status = allocator.apply() if sys.argv[1] == "apply" else None
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
      _fields_ = [(n, ctypes.c_size_t) for n in
                  "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    before = libc.mallinfo2().hblks
    block = libc.malloc(1 << 26)  # 64 MiB: mmap'ed under glibc's defaults
    main = libc.mallinfo2().hblks - before
    # 128 MiB from another thread (as XLA's workers allocate): a per-thread arena mmaps a block
    # over its 64 MiB heap even with M_MMAP_MAX=0; with one arena it comes from the main heap
    blocks = []
    worker = threading.Thread(target=lambda: blocks.append(libc.malloc(1 << 27)))
    worker.start(); worker.join()
    print(json.dumps({"main_thread": main, "other_thread": libc.mallinfo2().hblks - before - main,
                      "applied": status.applied if status else None}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_real_glibc_keeps_large_blocks_off_mmap():
  """Under the defaults a 64 MiB malloc (and a 128 MiB one from another thread) is a fresh mmap;
  after apply() both come from the heap."""
  try:
    default = _python(MMAPPED_BLOCKS, args=("default",))
  except AssertionError as e:
    if "mallinfo2" in str(e):
      pytest.skip("glibc older than 2.33 (no mallinfo2)")
    raise
  applied = _python(MMAPPED_BLOCKS, args=("apply",))
  assert default == {"main_thread": 1, "other_thread": 1, "applied": None}
  assert applied == {"main_thread": 0, "other_thread": 0, "applied": True}


LAUNCH_ORDER = """
    import json, runpy, sys
    from moe import allocator
    seen = []

    class Recorder:
      def mallopt(self, param, value):
        seen.append([param, value, "jax" in sys.modules])
        return 1

    allocator._glibc = lambda: (Recorder(), "recorder")
    sys.argv = ["launch.py", "--workdir="]  # an error after the module level ran: exit 2
    try:
      runpy.run_path("launch.py", run_name="__main__")
    except SystemExit:
      pass
    print(json.dumps({"calls": seen, "jax_loaded": "jax" in sys.modules,
                      "detail": allocator.status().describe()}))
"""


def test_launch_applies_it_before_jax():
  out = _python(LAUNCH_ORDER)
  assert out["jax_loaded"], "launch.py should have imported jax after the allocator call"
  assert [c[:2] for c in out["calls"]] == [list(c) for c in EXPECTED_CALLS]
  assert not any(c[2] for c in out["calls"]), "mallopt ran after jax was imported"
  assert out["detail"].startswith("recorder mallopt")


def test_launch_opt_out():
  out = _python(LAUNCH_ORDER, env_extra={allocator.OPT_OUT_ENV: "1"})
  assert out["calls"] == [] and "MOE_SYSTEM_MALLOC=1" in out["detail"]


def test_launch_calls_apply_above_every_jax_import():
  """Statically too: the apply() call comes before the first `import jax` of launch.py."""
  with open(os.path.join(REPO, "launch.py")) as f:
    tree = ast.parse(f.read())
  apply_line = min(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
                   and getattr(n.func, "attr", None) == "apply"
                   and getattr(n.func.value, "id", None) == "allocator")
  jax_lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Import)
               and any(a.name.split(".")[0] == "jax" for a in n.names)]
  assert jax_lines and apply_line < min(jax_lines)
