"""Phase 9 of training (`moe.train.trainer`): the loop of steps, logging windows, evaluation,
checkpoints, preemption and divergence, and the helpers it shares with evaluation.

`Loop(...).run(state, stop_at_step, guard)` trains from `state["step"]` to `train.steps`:
every `log_every` steps a record (the window of step metrics since the last one, averaged:
`moe.train.metrics.summarize_window`, plus throughput, TFLOP/s per device and MFU) goes to
metrics.jsonl, TensorBoard and the progress line; every `eval_every` steps (and at the end) an
evaluation; every `checkpoint_every` steps (and at the end) a checkpoint that also holds the
unlogged window, so a resumed run's records equal an uninterrupted run's; a stop request
(SIGTERM / Ctrl-C, `moe.train.preemption`) or `stop_at_step` saves and ends "preempted"; a
non-finite loss, a loss blow-up or too many loss spikes (`moe.train.divergence`, judged on each
logged window's per-step cross-entropy) ends "diverged", and that state is never saved.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from moe.train import divergence
from moe.train import metrics as metrics_lib
from moe.train import step as step_lib
from moe.train.profiling import ProfileWindow

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "target_bytes")


def global_batch(batch: dict, sharding) -> dict:
  """This process's rows [B/P, L] -> global arrays [B, L] sharded by batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in BATCH_KEYS}


def run_eval(eval_step, params, moe_bias, batches) -> dict:
  sums: dict[str, float] = {}
  for b in batches:
    out = jax.device_get(eval_step(params, moe_bias, b))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return step_lib.eval_metrics(sums) if sums else {}


def tokens_per_step(cfg) -> int:
  return cfg.train.batch_size * cfg.data.seq_len


class Loop:
  """Phase 9: steps, logging windows, evaluation, checkpoints, preemption, divergence."""

  def __init__(self, cfg, workdir, s, checkpointer, train_step, eval_step, eval_batches,
               *, last_saved, flops, log_state=None):
    """`s`: the trainer's `Setup`; `flops`: its `_Flops` (rates for the records)."""
    self.cfg, self.s, self.checkpointer, self.flops = cfg, s, checkpointer, flops
    self.train_step, self.eval_step, self.eval_batches = train_step, eval_step, eval_batches
    self.log = metrics_lib.MetricsLog(
        workdir, total_steps=cfg.train.steps, primary=jax.process_index() == 0,
        wandb_project=cfg.train.get("wandb_project", ""),
        config=cfg.to_dict() if cfg.train.get("wandb_project", "") else None)
    self.profile = ProfileWindow(cfg.train.get("profile_steps", ""), workdir)
    self.status, self.step, self.last_eval = "completed", 0, {}
    self.last_saved = last_saved
    self.train_time, self.train_steps = 0.0, 0
    # The step metrics since the last record; a checkpoint saves them (`log` item), so a
    # resumed run's first record averages the same steps as an uninterrupted run's.
    self.window: list = metrics_lib.window_from_state(log_state)
    self.divergence = divergence.Monitor(divergence.rule_from(cfg.train),
                                         (log_state or {}).get("divergence"))
    self.diverged_why = "non-finite loss"
    self.watch = metrics_lib.Stopwatch()  # the current logging window, minus eval / saving

  def run(self, state, stop_at_step, guard):
    tc = self.cfg.train
    self.step = int(jax.device_get(state["step"]))
    start_step = self.step
    self.log.truncate_after(self.step)  # records a killed run wrote after its last checkpoint
    while self.step < tc.steps:
      if guard.requested() or (stop_at_step is not None and self.step >= stop_at_step):
        self.status = "preempted"
        break
      batch = global_batch(next(self.s.data.train_iter), self.s.batch_sharding)
      self.profile.before_step(self.step)
      state, m = self.train_step(state, batch)
      self.step += 1
      self.profile.after_step(self.step, state)
      self.window.append(m)
      due = self.step % tc.checkpoint_every == 0 or self.step == tc.steps
      if not self._log_and_eval(state) or (due and not self._save(state)):
        self._diverged()
        break
    if self.status == "preempted" and self.last_saved != self.step and not self._save(state):
      self._diverged()
    self.profile.stop()
    if self.status == "completed" and self.step == start_step and not self.last_eval:
      self.last_eval = run_eval(self.eval_step, state["params"], state["moe_bias"],
                                self.eval_batches)  # resumed a finished run: evaluate it
    return state

  def _log_and_eval(self, state) -> bool:
    """Writes this step's record if one is due; False when the loss is not finite."""
    tc, step = self.cfg.train, self.step
    record = {}
    if step % tc.log_every == 0 or step == tc.steps:
      host = jax.device_get(self.window)
      elapsed = max(self.watch.elapsed(), 1e-9)
      record = metrics_lib.summarize_window(host)
      self.divergence.observe_window(
          step, [m.get("cross_entropy", m.get("loss")) for m in host])
      record["loss_spikes"] = self.divergence.spikes
      record["steps_per_s"] = len(host) / elapsed
      record["tokens_per_s"] = len(host) * tokens_per_step(self.cfg) / elapsed
      record.update(self.flops.rates(record["steps_per_s"]))
      self.train_time += elapsed
      self.train_steps += len(host)
      self.window = []
      self.watch.restart()
    if step % tc.eval_every == 0 or step == tc.steps:
      t0 = time.time()
      self.last_eval = run_eval(self.eval_step, state["params"], state["moe_bias"],
                                self.eval_batches)
      self.watch.exclude(time.time() - t0)
      record.update(self.last_eval)
    if record:
      self.log.write(step, record)
      if "loss" in record:
        self.log.progress(step, record, steps_per_s=record["steps_per_s"])
    if not metrics_lib.is_finite_record(record):
      return False
    if self.divergence.reason:
      self.diverged_why = self.divergence.reason
      return False
    return True

  def _diverged(self):
    self.status = "diverged"
    logging.warning("%s at step %d: stopping (status 'diverged')", self.diverged_why, self.step)

  def stability(self) -> dict:
    """summary.json's loss_spikes, loss_spike_steps and diverged_reason."""
    out = self.divergence.summary()
    if self.status == "diverged" and not out["diverged_reason"]:
      out["diverged_reason"] = self.diverged_why
    return out

  def _save(self, state) -> bool:
    """Saves a checkpoint of `state`; False (nothing saved) when a step since the last logging
    window had a non-finite loss: a diverged state is never saved, whatever asked for it."""
    if not _finite(self.window, "loss"):
      return False
    t0 = time.time()
    self.checkpointer.save(self.step, state, self.s.data.train_iter.get_state(),
                           {**metrics_lib.window_state(self.window),
                            "divergence": self.divergence.state()})
    self.last_saved = self.step
    self.watch.exclude(time.time() - t0)
    return True


def _finite(window, key: str) -> bool:
  """True unless a not-yet-logged step in `window` has a non-finite `key` (forces a sync)."""
  if not window:
    return True
  vals = np.asarray(jax.device_get([m[key] for m in window]), np.float64)
  return bool(np.all(np.isfinite(vals)))
