"""Training metrics: windows of step metrics -> one record, written to metrics.jsonl,
TensorBoard / console (CLU writers) and a progress line.

A record (one JSON object per logged step in `workdir/metrics.jsonl`) holds:

- `step`; `loss` (cross-entropy + MoE auxiliary losses), `cross_entropy`, `aux_loss` (sum over
  MoE layers of each layer's weighted losses: the term added to the loss), `load_balance_loss`
  and `z_loss` (unweighted, averaged over layers; L_bal is 1.0 at perfect balance), `grad_norm`
  (trainable gradients, before clipping), `learning_rate`, `tokens_per_s`, `steps_per_s`;
  all averaged over the steps since the previous record (the logging window);
- per MoE layer `moe/layer_<i>/<metric>` for every scalar the layer reports, plus
  `moe/layer_<i>/load` (mean fraction of assignments per expert over the window, a list) and
  `moe/layer_<i>/dead_experts` (experts with zero load over the whole window);
- `moe/<metric>`: the mean of each per-layer metric over layers, and `moe/dead_experts` (summed);
- after an evaluation: `eval_loss`, `eval_cross_entropy`, `eval_bits_per_byte` (sum of nats /
  ln 2 / sum of the UTF-8 bytes the target tokens stand for), `eval_moe/dropped_fraction`, ...
"""

from __future__ import annotations

from absl import logging
import math
import time

import numpy as np

from moe import rundir
from moe.rundir import METRICS_FILE, append_metrics, read_metrics, write_metrics


def summarize_window(window: list[dict]) -> dict:
  """Host step-metric dicts (one per step) -> one record (without `step`)."""
  if not window:
    return {}
  out = {}
  layer_metrics: dict[str, dict[str, float]] = {}
  for key in window[0]:
    vals = np.stack([np.asarray(m[key], np.float64) for m in window])
    mean = vals.mean(axis=0)
    if key.startswith("moe/layer_"):
      _, layer, name = key.split("/", 2)
      if name == "load":
        out[key] = [round(float(x), 6) for x in mean]
        dead = int(np.sum(vals.sum(axis=0) == 0))
        out[f"moe/{layer}/dead_experts"] = dead
        layer_metrics.setdefault(layer, {})["dead_experts"] = dead
        continue
      if mean.ndim:  # any other per-expert vector: keep the mean as a list
        out[key] = [round(float(x), 6) for x in mean]
        continue
      out[key] = float(mean)
      layer_metrics.setdefault(layer, {})[name] = float(mean)
    elif mean.ndim == 0:
      out[key] = float(mean)
  if layer_metrics:
    names = sorted({n for d in layer_metrics.values() for n in d})
    for name in names:
      vals = [d[name] for d in layer_metrics.values() if name in d]
      out[f"moe/{name}"] = int(sum(vals)) if name == "dead_experts" else float(np.mean(vals))
    for name in ("load_balance_loss", "z_loss"):
      if f"moe/{name}" in out:
        out[name] = out[f"moe/{name}"]
  return out


def is_finite_record(record: dict) -> bool:
  return all(math.isfinite(record[k]) for k in ("loss", "cross_entropy", "eval_loss")
             if isinstance(record.get(k), float))


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLog:
  """Writes records to metrics.jsonl and the CLU writers (process 0 only), prints progress."""

  def __init__(self, workdir: str, *, total_steps: int, primary: bool):
    from clu import metric_writers  # imports TensorFlow for TensorBoard: only when training
    self.path = rundir.join(workdir, METRICS_FILE)  # local or gs:// (CLU's writers too)
    self.total_steps = total_steps
    self.primary = primary
    # Headline scalars: console + TensorBoard. Per-layer scalars: TensorBoard only (dozens of
    # them would bury the console).
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
    self.layer_writer = metric_writers.SummaryWriter(workdir) if primary else None

  def truncate_after(self, step: int) -> None:
    """On resume from `step`: drop records of steps that will be trained again."""
    if not self.primary or not rundir.exists(self.path):
      return
    write_metrics(self.path, [r for r in read_metrics(self.path)  # skips a line cut by a kill
                              if "step" in r and r["step"] <= step])

  def write(self, step: int, record: dict) -> None:
    record = {"step": int(step), **record}
    if self.primary:
      append_metrics(self.path, record)
    scalars = {k: v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    per_layer = {k: v for k, v in scalars.items() if k.startswith("moe/layer_")}
    self.writer.write_scalars(int(step), {k: v for k, v in scalars.items() if k not in per_layer})
    self.writer.flush()
    if self.layer_writer is not None and per_layer:
      self.layer_writer.write_scalars(int(step), per_layer)
      self.layer_writer.flush()

  def progress(self, step: int, record: dict, *, steps_per_s: float) -> None:
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
    parts = [f"step {step}/{self.total_steps}"]
    for key, label in (("loss", "loss"), ("cross_entropy", "ce"), ("eval_loss", "eval_loss"),
                       ("eval_bits_per_byte", "eval_bpb")):
      if key in record:
        parts.append(f"{label} {record[key]:.4f}")
    if "moe/max_over_mean_load" in record:
      parts.append(f"max/mean load {record['moe/max_over_mean_load']:.2f}")
    if "learning_rate" in record:
      parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"{steps_per_s:.2f} steps/s")
    if "tokens_per_s" in record:
      parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    parts.append(f"ETA {_fmt_time(eta)}")
    if self.primary:
      logging.info("%s", " | ".join(parts))

  def close(self) -> None:
    for w in (self.writer, self.layer_writer):
      if w is not None:
        w.flush()
        w.close()


class Stopwatch:
  """Wall time of the training loop minus what evaluation and checkpointing took."""

  def __init__(self):
    self.start = time.time()
    self.excluded = 0.0

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def elapsed(self) -> float:
    return time.time() - self.start - self.excluded

  def restart(self) -> None:
    self.start = time.time()
    self.excluded = 0.0
