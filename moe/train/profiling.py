"""`train.profile_steps`: a `jax.profiler` trace of a window of training steps.

`"start:end"` traces the steps that take the step counter (as in metrics.jsonl) from `start` to
`end`, i.e. steps start+1 .. end, into `<workdir>/profile/` (TensorBoard's profile plugin reads
it: `tensorboard --logdir <workdir>`, tab "Profile"). `""` is off. The trace starts after step
`start` has finished (compilation and warm-up stay out of it) and stops once step `end`'s
results are ready. A run resumed past `start` traces nothing.
"""

from __future__ import annotations

import re

import jax

from moe import rundir
from moe.rundir import PROFILE_DIR

_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_profile_steps(spec) -> tuple[int, int] | None:
  """`"start:end"` -> (start, end); `""` -> None (off); anything else raises ValueError."""
  if spec == "":
    return None
  m = _SPEC.match(spec) if isinstance(spec, str) else None
  if not m:
    raise ValueError(f"not 'start:end': {spec!r}")
  return int(m.group(1)), int(m.group(2))


class ProfileWindow:
  """Starts and stops the trace around the training loop's steps."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse_profile_steps(spec)
    self.directory = rundir.join(workdir, PROFILE_DIR)
    self.active = False

  def before_step(self, step: int) -> None:
    """Call with the number of steps done, before running the next one."""
    if self.window is not None and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state) -> None:
    """Call with the number of steps done and the state the last step returned."""
    if self.active and step >= self.window[1]:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
