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
- `tflops_per_device` (model FLOPs, `moe.model.flops`, per second and device over the window)
  and `mfu` (that over the device's peak, `moe.train.peaks`; absent when the peak is unknown).

Where records go: metrics.jsonl; TensorBoard (every scalar, and each layer's `load` as a
histogram `moe/layer_<i>/load`); Weights & Biases when `train.wandb_project` is set and `wandb`
is importable; the console gets only the progress line (`MetricsLog.progress`).
"""

from __future__ import annotations

from absl import logging
import math
import os
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


def window_state(window: list) -> dict:
  """The unlogged step metrics (device or host arrays) as JSON-able lists: float32 values are
  exact as Python floats, so a restored window averages to the same bits."""
  import jax  # pylint: disable=g-import-not-at-top  (metrics stays light for readers)
  host = jax.device_get(window)
  return {"format": 1, "window": [{k: np.asarray(v).tolist() for k, v in m.items()}
                                  for m in host]}


def window_from_state(state: dict | None) -> list[dict]:
  """`window_state`'s output -> host step-metric dicts (an empty window for None)."""
  if not state:
    return []
  return [{k: np.asarray(v, np.float64) for k, v in m.items()} for m in state["window"]]


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
  """Writes records to metrics.jsonl, TensorBoard and W&B (process 0 only), prints progress.

  The progress line is the project's own rather than `clu.periodic_actions.ReportProgress`:
  that action measures steps/s between its calls (evaluation and checkpoint time included,
  while ours comes from `Stopwatch`, which excludes them), reports through work-unit notes (a
  second console line per logged step) and knows nothing of the loss, load or MFU that the
  line carries.
  """

  def __init__(self, workdir: str, *, total_steps: int, primary: bool,
               wandb_project: str = "", config: dict | None = None):
    from clu import metric_writers  # imports TensorFlow for TensorBoard: only when training
    self.path = rundir.join(workdir, METRICS_FILE)  # local or gs:// (CLU's writers too)
    self.total_steps = total_steps
    self.primary = primary
    # TensorBoard only: the console gets the progress line, not CLU's logging writer.
    self.writer = metric_writers.SummaryWriter(workdir) if primary else None
    self.wandb = None
    if primary and wandb_project:
      self.wandb = wandb_writer(wandb_project, workdir, config)

  def truncate_after(self, step: int) -> None:
    """On resume from `step`: drop records of steps that will be trained again, and any record
    whose step is not above the one before it (a duplicate: the file holds one record per
    logged step, in order)."""
    if not self.primary or not rundir.exists(self.path):
      return
    kept, last = [], -1
    for r in read_metrics(self.path):  # skips a line cut by a kill
      if isinstance(r.get("step"), int) and last < r["step"] <= step:
        kept.append(r)
        last = r["step"]
    write_metrics(self.path, kept)

  def write(self, step: int, record: dict) -> None:
    record = {"step": int(step), **record}
    if not self.primary:
      return
    append_metrics(self.path, record)
    scalars = {k: v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    loads = {k: np.asarray(v, np.float64) for k, v in record.items()
             if k.startswith("moe/layer_") and k.endswith("/load") and isinstance(v, list)}
    self.writer.write_scalars(int(step), scalars)
    if loads:
      self.writer.write_histograms(int(step), loads)
    self.writer.flush()
    if self.wandb is not None:
      self.wandb.write_scalars(int(step), scalars)

  def progress(self, step: int, record: dict, *, steps_per_s: float) -> None:
    if self.primary:
      logging.info("%s", progress_line(step, self.total_steps, record, steps_per_s))

  def close(self) -> None:
    for w in (self.writer, self.wandb):
      if w is not None:
        w.flush()
        w.close()


def progress_line(step: int, total_steps: int, record: dict, steps_per_s: float) -> str:
  """`step 20/40 | loss 4.35 | ... | 0.56 steps/s | 2298 tok/s | 0.01 TFLOP/s/dev | MFU 9.1% |
  ETA 0m36s`: the one console line of a logged step."""
  eta = (total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
  parts = [f"step {step}/{total_steps}"]
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
  if "tflops_per_device" in record:
    parts.append(f"{record['tflops_per_device']:.3g} TFLOP/s/dev")
  if "mfu" in record:
    parts.append(f"MFU {100 * record['mfu']:.3g}%")
  parts.append(f"ETA {_fmt_time(eta)}")
  return " | ".join(parts)


class WandbWriter:
  """Scalars to a Weights & Biases run (the `wandb` package is optional, imported here only)."""

  def __init__(self, wandb, project: str, workdir: str, config: dict | None):
    self.run = wandb.init(project=project, dir=None if rundir.is_remote(workdir) else workdir,
                          name=os.path.basename(os.path.normpath(workdir)), config=config or {})

  def write_scalars(self, step: int, scalars: dict) -> None:
    self.run.log(dict(scalars), step=step)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.run.finish()


def wandb_writer(project: str, workdir: str, config: dict | None) -> WandbWriter | None:
  """A W&B writer for `train.wandb_project`, or None (with a warning) without `wandb`."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.warning("train.wandb_project=%r but the wandb package is not installed: "
                    "metrics go to metrics.jsonl and TensorBoard only", project)
    return None
  return WandbWriter(wandb, project, workdir, config)


def describe_data(info: dict, since: float | None = None) -> str:
  """One start-up line about the data, from `Data.info`: "prepared" when its packed rows were
  written after `since` (a time.time() taken before building the data), else "reused"."""
  parts = [f"data: {info.get('name', '?')}"]
  for split in ("train", "validation"):
    if f"{split}_rows" in info:
      parts.append(f"{split} {info[f'{split}_rows']} rows / "
                   f"{info.get(f'{split}_tokens', 0) / 1e6:.2f}M tokens")
  parts.append(f"{info.get('tokenizer', '?')} tokenizer (V={info.get('vocab_size', '?')}), "
               f"L={info.get('seq_len', '?')}")
  if "prepare_seconds" in info:
    how = "ready"
    stamp = os.path.join(info.get("packed_dir", ""), "info.json")  # the data dir is local
    if since is not None and os.path.exists(stamp):
      how = "prepared" if os.path.getmtime(stamp) >= since else "reused"
    parts.append(f"{how} in {info['prepare_seconds']:.1f} s ({info.get('packed_dir', '')})")
  return ", ".join(parts)


def describe_model(num_params: int, num_active: int, flops_per_token: float, peak) -> str:
  """One start-up line: parameters, active parameters per token, model FLOPs per token."""
  line = (f"model: {num_params / 1e6:.2f}M params, {num_active / 1e6:.2f}M active per token, "
          f"{flops_per_token / 1e6:.2f} MFLOPs per training token (fwd+bwd)")
  if peak is not None:
    line += f"; peak {peak.flops_per_s / 1e12:.3g} TFLOP/s per device ({peak.source})"
  return line


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
