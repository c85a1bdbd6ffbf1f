"""When a training run counts as diverged: a non-finite loss, a loss blow-up, or too many spikes.

The trainer's loop (`moe.train.loop`) feeds every step's training cross-entropy (`cross_entropy`,
the loss without the MoE auxiliary terms, so runs with and without z-loss are judged alike) to a
`Monitor` when it logs a window of steps (no extra device sync). With W = `train.spike_window`
and the steps after `train.warmup_steps` only:

- a step is a loss SPIKE when its cross-entropy exceeds `train.spike_factor` x the median of the
  W finite values before it; consecutive spike steps are one spike (the count rises when a step
  spikes and the step before did not). Spikes are counted once W values are there.
- a loss BLOW-UP is the running median (of the W steps before a step) more than
  `train.blowup_margin` nats above the lowest running median seen since warmup (0 = off): the
  run has lost what it learned, even if every value stays finite (a collapse to the unigram
  distribution is about 2 nats above a trained byte model here).

The run ends "diverged" at the logged step where a non-finite loss (the loop's own check), a
blow-up, or more than `train.max_loss_spikes` spikes is first seen; `reason` says which. The spike
count goes into every metrics.jsonl record (`loss_spikes`) and, with the reason, into
summary.json (`summary()`), so a sweep report can show it per run. The monitor's state travels in
the checkpoint's log item (`state()` / `Monitor(rule, state)`), so a resumed run decides exactly
as an uninterrupted one; a checkpoint written before this existed resumes with a fresh monitor.

Pure Python and numpy (no jax): tests feed it synthetic loss curves.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moe.errors import INT32_MAX, check_bool, check_int, check_number

FORMAT = 1
# The train fields this module reads, with their defaults (a config.json written before they
# existed reads as these).
DEFAULTS = {"spike_factor": 1.5, "spike_window": 50, "max_loss_spikes": 5, "blowup_margin": 1.0,
            "decay_router": True}
MAX_WINDOW = 100_000  # the window is kept in every checkpoint


@dataclasses.dataclass(frozen=True)
class Rule:
  spike_factor: float = DEFAULTS["spike_factor"]
  spike_window: int = DEFAULTS["spike_window"]
  max_loss_spikes: int = DEFAULTS["max_loss_spikes"]
  blowup_margin: float = DEFAULTS["blowup_margin"]
  start_step: int = 0  # spikes and blow-ups are looked for at steps > this (the warmup)


def rule_from(tc) -> Rule:
  """The `train` group -> Rule (missing fields take `DEFAULTS`)."""
  get = lambda k: tc.get(k, DEFAULTS[k]) if hasattr(tc, "get") else DEFAULTS[k]  # noqa: E731
  return Rule(spike_factor=float(get("spike_factor")), spike_window=int(get("spike_window")),
              max_loss_spikes=int(get("max_loss_spikes")),
              blowup_margin=float(get("blowup_margin")),
              start_step=int(tc.get("warmup_steps", 0)))


def check_fields(tc) -> None:
  """ConfigError (one line, naming the field) for a bad divergence or router-decay field."""
  get = lambda k: tc.get(k, DEFAULTS[k])  # noqa: E731
  check_number("train.spike_factor", get("spike_factor"), 1.0, math.inf, low_open=True)
  check_int("train.spike_window", get("spike_window"), 1, high=MAX_WINDOW)
  check_int("train.max_loss_spikes", get("max_loss_spikes"), 0, high=INT32_MAX)
  check_number("train.blowup_margin", get("blowup_margin"), 0.0, math.inf)
  check_bool("train.decay_router", get("decay_router"))


class Monitor:
  """Spike count and divergence reason over the per-step losses it is given (module doc)."""

  def __init__(self, rule: Rule, state: dict | None = None):
    self.rule = rule
    state = state if isinstance(state, dict) and state.get("format") == FORMAT else {}
    self.history: list[float] = [float(x) for x in state.get("history", [])]
    self.spikes: int = int(state.get("spikes", 0))
    self.spike_steps: list[int] = [int(s) for s in state.get("spike_steps", [])]
    self.in_spike: bool = bool(state.get("in_spike", False))
    self.lowest: float | None = state.get("lowest")
    self.reason: str | None = state.get("reason")

  def state(self) -> dict:
    """JSON-able; floats are exact through JSON."""
    return {"format": FORMAT, "history": list(self.history), "spikes": self.spikes,
            "spike_steps": list(self.spike_steps), "in_spike": self.in_spike,
            "lowest": self.lowest, "reason": self.reason}

  def observe(self, step: int, value: float) -> None:
    """One step's training cross-entropy (`step` counts from 1). Non-finite values are left to
    the loop's own check and kept out of the window."""
    value = float(value)
    if not math.isfinite(value):
      return
    r = self.rule
    if step > r.start_step and len(self.history) >= r.spike_window:
      median = float(np.median(self.history))
      spike = value > r.spike_factor * median
      if spike and not self.in_spike:
        self.spikes += 1
        self.spike_steps = (self.spike_steps + [int(step)])[-100:]
        if self.spikes > r.max_loss_spikes and self.reason is None:
          self.reason = (f"{self.spikes} loss spikes by step {step} (> train.max_loss_spikes="
                         f"{r.max_loss_spikes}; a spike: train cross-entropy > "
                         f"{r.spike_factor:g} x the median of the previous {r.spike_window} steps)")
      self.in_spike = spike
      self.lowest = median if self.lowest is None else min(self.lowest, median)
      if r.blowup_margin > 0 and median > self.lowest + r.blowup_margin and self.reason is None:
        self.reason = (f"loss blow-up at step {step}: the running median train cross-entropy "
                       f"{median:.4f} is more than train.blowup_margin={r.blowup_margin:g} "
                       f"above its lowest {self.lowest:.4f}")
    self.history = (self.history + [value])[-r.spike_window:]

  def observe_window(self, last_step: int, values) -> None:
    """The losses of the steps last_step - len(values) + 1 .. last_step, in order."""
    values = list(values)
    for i, v in enumerate(values):
      self.observe(last_step - len(values) + 1 + i, v)

  def summary(self) -> dict:
    """What summary.json gets: the spike count, the first spike steps and the reason (or None)."""
    return {"loss_spikes": self.spikes, "loss_spike_steps": self.spike_steps[:20],
            "diverged_reason": self.reason}


def judge(losses, rule: Rule) -> Monitor:
  """A monitor that has seen `losses` (steps 1, 2, ...): the same decision as in training."""
  m = Monitor(rule)
  m.observe_window(len(list(losses)), losses)
  return m
