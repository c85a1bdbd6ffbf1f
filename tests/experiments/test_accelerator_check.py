"""experiments/accelerator_check.py: the committed results render to the committed section, and
a --smoke run on CPU completes with every section ok and every correctness row passing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "accelerator_check.py")
RESULTS = os.path.join(REPO, "experiments", "accelerator_results", "nvidia-h200_2026-11-30.json")
BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
HEADING = "## Accelerator check"
SECTIONS = ("device", "correctness", "layer_bench", "train")


def run_script(*args, timeout: float):
  """The script run as documented (`python experiments/accelerator_check.py ...`) from the repo
  root; inherits the session's JAX compilation cache through the environment (conftest)."""
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def markdown_section(text: str, heading: str) -> str:
  """From the line `heading` up to the next line starting with '## ' (or the end)."""
  lines = text.splitlines(keepends=True)
  start = next(i for i, line in enumerate(lines) if line.rstrip() == heading)
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
  return "".join(lines[start:end])


def test_committed_results_render_to_committed_section(tmp_path):
  with open(BENCHMARKS) as f:
    committed = f.read()
  proc = run_script("--from-json", RESULTS, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(HEADING + "\n"), proc.stdout[:200]
  assert proc.stdout.rstrip("\n") == markdown_section(committed, HEADING).rstrip("\n")
  # Re-rendering into a copy of BENCHMARKS.md (the documented command) changes no byte of it.
  copy = tmp_path / "BENCHMARKS.md"
  shutil.copyfile(BENCHMARKS, copy)
  proc = run_script("--from-json", RESULTS, "--output", str(copy), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert copy.read_text() == committed


@pytest.mark.slow
def test_smoke_run(tmp_path):
  # A generous time box: on a loaded CPU the default 400 s share per section could skip rows.
  proc = run_script("--smoke", "--out", str(tmp_path), "--budget-s", "900", timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / "accelerator_check.json") as f:
    results = json.load(f)
  assert results["meta"]["smoke"] is True
  assert results["meta"]["forbidden_modules_loaded"] == []
  assert results["errors"] == [], results["errors"]
  for name in SECTIONS:
    assert results["sections"][name]["status"] == "ok", (name, results["sections"][name])
  corr = results["sections"]["correctness"]
  assert corr["rows"] and corr["checked"] > 0 and corr["passed"] == corr["checked"]
  for row in corr["rows"]:
    assert row.get("pass") is True or row.get("skipped") == "capacity only", row
  assert results["sections"]["train"]["loss_finite_and_falling"] is True
  md = (tmp_path / "accelerator_check.md").read_text()
  assert md.startswith(HEADING + "\n\n**Smoke run**")
  for title in ("### 1. Device peak", "### 2. Dispatch strategies", "### 3. MoE layer",
                "### 4. Training run"):
    assert title in md


def test_committed_section_says_what_auto_should_pick_with_the_numbers():
  proc = run_script("--from-json", RESULTS, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  picks = [line for line in proc.stdout.splitlines() if "`auto` should pick" in line]
  with open(RESULTS) as f:
    shapes = json.load(f)["sections"]["layer_bench"]["fastest"]
  assert len(picks) == len(shapes) > 0
  for line in picks:
    # Both routings name a strategy with its ratio, TFLOP/s and share of the measured peak,
    # then whether `auto` (as it was in that run) agrees.
    should, agree = line.split(". With a capacity ")
    assert should.count("x dense, ") == 2 and should.count(" TFLOP/s, ") == 2, line
    assert should.count("% of peak)") == 2, line
    assert agree.count("as `auto` does") + agree.count("`auto` picks") == 2, line


def test_a_kernel_the_backend_lacks_is_skipped_with_the_reason(monkeypatch):
  """On a GPU, `megablox` (a Pallas TPU kernel) is neither checked nor timed, and says why;
  a strategy the backend has is not skipped."""
  jax = pytest.importorskip("jax")
  monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
  import accel_layer
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

  class Ctx:
    def left(self, section):
      return 100.0

    def error(self, where, e):
      raise AssertionError(f"{where}: {e}")

  def must_not_run():
    raise AssertionError("ran a strategy the backend lacks")

  row = accel_layer.corr_row(Ctx(), "megablox", "float32", "dropless", None, 0.0, {}, must_not_run)
  assert "pass" not in row and "not gpu" in row["skipped"], row
  assert "not gpu" in accel_layer.not_timed("megablox")
  assert accel_layer.not_timed("ragged") is None
  row = accel_layer.corr_row(Ctx(), "ragged", "float32", "dropless", None, 0.0, {"out": 1.0},
                             lambda: {"out": 1.0})
  assert row["pass"] is True and "skipped" not in row


def test_the_triton_variant_is_skipped_where_jax_lacks_its_module(monkeypatch):
  """jax's Pallas/Triton ragged_dot flag imports a module the released wheels do not ship; the
  check then skips that variant with the reason instead of failing on it."""
  jax = pytest.importorskip("jax")
  monkeypatch.syspath_prepend(os.path.join(REPO, "experiments"))
  import importlib.util
  import types
  import accel_layer
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  ctx = types.SimpleNamespace(cfg={}, args=types.SimpleNamespace(mem_limit_gb=60.0),
                              left=lambda section: 100.0)
  shape = {"T": 64, "D": 8, "F": 8, "E": 4, "K": 2}
  assert ("ragged", None, None, "triton") in accel_layer.bench_entries(gpu=True)
  monkeypatch.setattr(accel_layer, "triton_lowering_shipped", lambda: False)
  row = accel_layer.bench_moe(ctx, shape, ("ragged", None, None, "triton"), None, 1e12, 10.0)
  assert "jax-ml/jax#40888" in row["skipped"] and "ms" not in row, row
  try:
    shipped = importlib.util.find_spec("jax._src.lax.pallas_lowerings") is not None
  except ModuleNotFoundError:
    shipped = False
  monkeypatch.undo()
  assert accel_layer.triton_lowering_shipped() == shipped
