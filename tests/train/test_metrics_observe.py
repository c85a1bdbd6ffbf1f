"""What a run reports about itself: MFU in records and summary, the profile window, the expert
load in TensorBoard and load.png, the W&B writer, the console lines, the optax schedule."""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import types

import pytest

from conftest import one_line_error, read_metrics
from moe.rundir import LOAD_PLOT_FILE, METRICS_FILE, write_metrics
from moe.train import checks
from moe.train import load_plot
from moe.train import metrics as metrics_lib
from moe.train import step as step_lib


class _FakeWandb(types.ModuleType):
  """Stands in for the `wandb` package: records what the writer sends."""

  def __init__(self):
    super().__init__("wandb")
    self.logged, self.inits, self.finished = [], [], 0

  def init(self, **kw):
    self.inits.append(kw)
    fake = self

    class Run:
      def log(self, data, step=None):
        fake.logged.append((step, dict(data)))

      def finish(self):
        fake.finished += 1

    return Run()


def _tensor_tags(workdir) -> dict[str, str]:
  """{tag: plugin name} of every tensor summary in the TensorBoard event files of `workdir`."""
  from tensorboard.backend.event_processing import event_accumulator
  tags = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      tags[tag] = acc.SummaryMetadata(tag).plugin_data.plugin_name
  return tags


@pytest.mark.slow  # one tiny training run with a profiler trace (~20-50 s on 2 busy cores)
def test_run_reports_mfu_profile_load_and_wandb(tiny_config, tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  from moe.train import trainer as train
  cfg = tiny_config({"train.steps": 4, "train.log_every": 2, "train.eval_every": 4,
                     "train.checkpoint_every": 4, "train.profile_steps": "2:3",
                     "train.wandb_project": "moe-test"})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["status"] == "completed"
  # FLOPs, TFLOP/s and MFU (a CPU: the measured peak) in every record and in the summary.
  records = read_metrics(tmp_path)
  for r in records:
    assert r["tflops_per_device"] > 0 and 0 < r["mfu"] < 1, r
  assert summary["train_flops_per_token"] > 0 and summary["peak_tflops_per_device"] > 0
  assert summary["mfu"] == pytest.approx(
      summary["tflops_per_device"] / summary["peak_tflops_per_device"])
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["tflops_per_device"] == summary["tflops_per_device"]
  # The profile window: a trace under <workdir>/profile.
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  # Expert load: a histogram per layer in TensorBoard, scalars there too, and load.png.
  tags = _tensor_tags(str(tmp_path))
  assert tags.get("moe/layer_0/load") == "histograms", tags
  assert tags.get("moe/layer_1/load") == "histograms"
  assert tags.get("mfu") == "scalars" and tags.get("moe/layer_0/dead_experts") == "scalars"
  png = tmp_path / LOAD_PLOT_FILE
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # W&B: the run was opened with the project and got the same scalars as the records.
  assert fake.inits[0]["project"] == "moe-test" and fake.finished == 1
  assert [s for s, _ in fake.logged] == [r["step"] for r in records]
  assert fake.logged[0][1]["loss"] == records[0]["loss"]
  assert fake.logged[-1][1]["eval_loss"] == records[-1]["eval_loss"]


@pytest.mark.slow  # a tiny run through launch.py (~30-60 s on 2 busy cores)
def test_console_is_one_line_per_phase_and_step(tmp_path, tiny_flags):
  """launch.py prints no TensorFlow banner, no CLU scalar dump: the start-up phases (data,
  model, state and compile) once each, then one progress line per logged step."""
  import re
  import subprocess
  from conftest import REPO
  args = ["--config=configs/default.py", f"--workdir={tmp_path}",
          *tiny_flags({"train.steps": 6, "train.log_every": 2, "train.profile_steps": "2:3"})]
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for noise in ("oneDNN", "InitializeLog", "logging_writer", "cpu_feature_guard"):
    assert noise not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("I")]  # absl INFO lines
  expected = [r"trainer.py:\d+\] data: textdir, train \d+ rows.* (prepared|reused) in",
              r"trainer.py:\d+\] model: [\d.]+M params, [\d.]+M active per token",
              r"trainer.py:\d+\] state initialized in [\d.]+ s; train step compiled in",
              *[rf"metrics.py:\d+\] step {s}/6 \| loss .* TFLOP/s/dev \| MFU" for s in (2, 4, 6)],
              r"trainer.py:\d+\] completed at step 6: eval_loss"]
  assert len(lines) == len(expected), "\n".join(lines)
  for line, pattern in zip(lines, expected):
    assert re.search(pattern, line), (pattern, line)
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_wandb_missing_is_not_an_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  log = metrics_lib.MetricsLog(str(tmp_path), total_steps=2, primary=True,
                               wandb_project="p")
  assert log.wandb is None
  log.write(1, {"loss": 1.0})
  log.close()
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


@pytest.mark.parametrize("spec", ["3:2", "2:2", "0:2", "2:99", "abc", "2-3", "2:"])
def test_profile_steps_validation(tiny_config, spec):
  cfg = tiny_config({"train.steps": 10, "train.profile_steps": spec})
  with one_line_error("train.profile_steps", "start:end", "0 < start < end <= train.steps"):
    checks.check_train(cfg)


@pytest.mark.parametrize("spec", ["", "1:10", " 2 : 5 "])
def test_profile_steps_accepted(tiny_config, spec):
  checks.check_train(tiny_config({"train.steps": 10, "train.profile_steps": spec}))


def test_load_plot_from_metrics(tmp_path):
  records = [{"step": s, "loss": 1.0, "moe/layer_0/load": [0.5, 0.25, 0.25, 0.0],
              "moe/layer_2/load": [0.25] * 4} for s in (10, 20, 30)]
  write_metrics(str(tmp_path / METRICS_FILE), records + [{"step": 30, "eval_loss": 1.0}])
  steps, loads = load_plot.load_history(records)
  assert steps == [10, 20, 30] and sorted(loads) == [0, 2] and loads[0].shape == (3, 4)
  path = load_plot.write_load_plot(str(tmp_path))
  assert path == str(tmp_path / LOAD_PLOT_FILE) and os.path.getsize(path) > 1000


def test_no_load_plot_for_a_dense_run(tmp_path):
  write_metrics(str(tmp_path / METRICS_FILE), [{"step": 2, "loss": 1.0}])
  assert load_plot.write_load_plot(str(tmp_path)) is None
  assert not (tmp_path / LOAD_PLOT_FILE).exists()


def test_progress_line_and_startup_lines():
  line = metrics_lib.progress_line(20, 40, {"loss": 4.3547, "tokens_per_s": 2298.0,
                                            "tflops_per_device": 0.0123, "mfu": 0.091}, 0.5)
  assert line.startswith("step 20/40 | loss 4.3547") and "\n" not in line
  assert "0.0123 TFLOP/s/dev" in line and "MFU 9.1%" in line and line.endswith("ETA 0m40s")
  assert "MFU" not in metrics_lib.progress_line(1, 2, {"loss": 1.0}, 1.0)
  data = metrics_lib.describe_data({"name": "pystdlib", "train_rows": 44271,
                                    "train_tokens": 11377524, "validation_rows": 4964,
                                    "validation_tokens": 1275531, "tokenizer": "byte",
                                    "vocab_size": 259, "seq_len": 256, "prepare_seconds": 0.6})
  assert data.startswith("data: pystdlib") and "train 44271 rows / 11.38M tokens" in data
  assert "ready in 0.6 s" in data
  from moe.train.peaks import Peak
  model = metrics_lib.describe_model(3_479_424, 1_120_128, 2.5e7, Peak(1e11, "cpu"))
  assert "3.48M params" in model and "1.12M active" in model and "25.00 MFLOPs" in model


def test_data_line_says_prepared_or_reused(tmp_path):
  import time
  before = time.time() - 1
  (tmp_path / "info.json").write_text("{}")
  info = {"name": "textdir", "prepare_seconds": 2.0, "packed_dir": str(tmp_path)}
  assert "prepared in 2.0 s" in metrics_lib.describe_data(info, since=before)
  assert "reused in 2.0 s" in metrics_lib.describe_data(info, since=time.time() + 1)


def _reference_lr(s, peak, warmup, total, ratio):
  """The schedule as step.learning_rate_schedule's docstring writes it."""
  if s < warmup:
    return peak * (s + 1) / warmup
  span = max(total - warmup, 1)
  floor = peak * ratio
  return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(s - warmup, span) / span))


@pytest.mark.parametrize("warmup, total, ratio", [(4, 14, 0.1), (0, 10, 0.0), (1, 6, 0.5),
                                                  (5, 5, 0.1), (3, 40, 1.0)])
def test_optax_schedule_equals_the_formula(warmup, total, ratio):
  from ml_collections import ConfigDict
  tc = ConfigDict({"learning_rate": 2e-3, "warmup_steps": warmup, "steps": total,
                   "min_lr_ratio": ratio})
  lr = step_lib.learning_rate_schedule(tc)
  for s in range(total + 3):
    assert float(lr(s)) == pytest.approx(_reference_lr(s, 2e-3, warmup, total, ratio),
                                         rel=1e-5), s
