"""moe.train.peaks: the spec-sheet table, the cached CPU measurement, TFLOP/s and MFU."""

from __future__ import annotations

import json
import types

import pytest

from moe.train import peaks


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("TPU v4", "bfloat16", 275), ("TPU v5 lite", "bfloat16", 197), ("TPU v5e", "float32", 197),
    ("TPU v5p", "bfloat16", 459), ("TPU v6 lite", "bfloat16", 918),
    ("NVIDIA A100-SXM4-80GB", "float32", 156), ("NVIDIA H100 80GB HBM3", "bfloat16", 989),
    ("NVIDIA H100 PCIe", "bfloat16", 756), ("NVIDIA H200", "bfloat16", 989),
    ("NVIDIA H200", "float32", 495)])
def test_table_peak(kind, dtype, tflops):
  assert peaks.table_peak(kind, dtype).flops_per_s == tflops * 1e12


def test_unknown_accelerator_has_no_peak_and_no_mfu():
  assert peaks.table_peak("Some Future Chip", "bfloat16") is None
  out = peaks.throughput(2e12, 3.0, 2, None)
  assert out == {"tflops_per_device": pytest.approx(3.0)}


def test_throughput_and_mfu():
  peak = peaks.Peak(10e12, "test")
  out = peaks.throughput(flops_per_step=8e12, steps_per_s=0.5, devices=2, peak=peak)
  assert out["tflops_per_device"] == pytest.approx(2.0)
  assert out["mfu"] == pytest.approx(0.2)


def test_cpu_peak_measured_once_then_cached(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(peaks, "measure_cpu_peak", lambda: calls.append(1) or 5e10)
  cache = tmp_path / "sub" / "cpu_peak.json"
  first = peaks.cpu_peak(str(cache))
  second = peaks.cpu_peak(str(cache))
  assert first.flops_per_s == second.flops_per_s == 5e10
  assert len(calls) == 1
  assert json.loads(cache.read_text()) == {peaks.cpu_key(): 5e10}
  assert "jax" in peaks.cpu_key() and "cores" in peaks.cpu_key()


def test_cpu_device_uses_the_measured_peak(tmp_path, monkeypatch):
  monkeypatch.setattr(peaks, "measure_cpu_peak", lambda: 4e10)
  cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
  import jax
  n = jax.local_device_count("cpu")
  assert peaks.device_peak(cpu, "float32", str(tmp_path / "c.json")).flops_per_s == 4e10 / n
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
  assert peaks.device_peak(gpu, "bfloat16").source.startswith("H200")


def test_measure_cpu_peak_is_plausible():
  flops = peaks.measure_cpu_peak(n=128, rounds=2)
  assert 1e7 < flops < 1e14
