"""SIGTERM and Ctrl-C (SIGINT) as a request to stop: the run saves and ends with "preempted".

`install()` (launch.py calls it as soon as its flags are parsed) and `PreemptionGuard` (the
trainer, around a whole run) turn both signals into a flag. The trainer polls it between phases
(after data preparation, after restoring, after compiling) and between steps, saves a checkpoint
of what it trained since the last one and returns with status "preempted" (exit code 0). Data
preparation and compilation are not interrupted: the request is honoured when they finish. A
second signal of the same kind gets the default behaviour (SIGTERM terminates, SIGINT raises
KeyboardInterrupt). Handlers can only be installed from the main thread; elsewhere this is inert.

Standard library only at import time (launch.py installs it before JAX is imported).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state = {"flag": None, "depth": 0, "previous": {}}


def _handle(signum, frame):
  del frame
  _state["flag"] = signal.Signals(signum).name
  # The second one of this kind: default behaviour (terminate / KeyboardInterrupt).
  signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


def install() -> bool:
  """Installs the handlers (once per process; nested calls count); False off the main thread."""
  if threading.current_thread() is not threading.main_thread():
    return False
  if _state["depth"] == 0:
    _state["flag"] = None
    _state["previous"] = {s: signal.signal(s, _handle) for s in SIGNALS}
  _state["depth"] += 1
  return True


def uninstall() -> None:
  """Undoes one `install()`; the outermost one restores the previous handlers."""
  if _state["depth"] == 0:
    return
  _state["depth"] -= 1
  if _state["depth"] == 0:
    for s, previous in _state["previous"].items():
      signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    _state["flag"] = None


def received() -> str | None:
  """The name of the signal that asked this process to stop ('SIGTERM', 'SIGINT'), or None."""
  return _state["flag"]


class PreemptionGuard:
  """`with PreemptionGuard() as guard:` ... `guard.requested()` between steps."""

  def __init__(self):
    self._active = False

  def __enter__(self):
    self._active = install()
    return self

  def __exit__(self, *exc):
    if self._active:
      uninstall()
      self._active = False
    return False

  def requested(self) -> bool:
    """True once any process got SIGTERM or SIGINT (all processes agree, so they save
    together; with several processes this is a collective call, made at the same points)."""
    import jax  # pylint: disable=g-import-not-at-top  (this module stays importable without JAX)
    flag = received() is not None
    if jax.process_count() == 1:
      return flag
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))
