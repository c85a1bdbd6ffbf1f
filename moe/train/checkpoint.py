"""Checkpoints with Orbax: training state, data position, resume, compatibility, SIGTERM.

A checkpoint is one directory per step under `workdir/checkpoints/<step>/` with two items:

- `state`: a pytree {step, params, opt_state, moe_bias, rng} (Orbax PyTree handler, sharded
  arrays written by every process, restored straight onto the target shardings, so a checkpoint
  written on one mesh restores onto another);
- `data`: each process's data-iterator state as JSON (`process_<i>-of-<n>.json`).

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; the temporary leftovers are deleted when the next
manager opens the directory. Only complete steps are listed, and the newest one is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moe import trees
from moe.errors import ConfigError
from moe import rundir
from moe.rundir import CHECKPOINTS_DIR

STATE = "state"
DATA = "data"


# ----------------------------------------------------------------------------- data item


class DataStateHandler(ocp.CheckpointHandler):
  """Saves a JSON-serializable data-iterator state, one file per process."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / name).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    """This process's state; with another process count, the state all saved processes
    agree on (`moe.data.pipeline`'s state is the global batch index, the same in every process)."""
    directory = epath.Path(directory)
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if path.exists():
      return json.loads(path.read_text())
    saved = sorted(p for p in directory.iterdir() if p.name.startswith("process_"))
    states = [json.loads(p.read_text()) for p in saved]
    if states and all(st == states[0] for st in states):
      return states[0]
    raise ConfigError(f"checkpoint {directory.parent} holds different data positions for "
                      f"{[p.name for p in saved]}, none for {name}: resume with the same number "
                      "of processes")

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------- manager


def _manager(directory, *, keep: int | None = None, read_only: bool = False,
             async_save: bool = True) -> ocp.CheckpointManager:
  # Readers neither create the directory nor clean up another run's temporary directories.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      rundir.absolute(directory), options=options,
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), DATA: DataStateHandler()})


def abstract_like(tree):
  """Arrays -> ShapeDtypeStruct with the same sharding (a restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
  """The checkpoints of one run: `directory` holds one sub-directory per saved step."""

  def __init__(self, directory, *, keep: int | None = None, async_save: bool = True):
    self.directory = rundir.absolute(directory)
    self._mngr = _manager(self.directory, keep=keep, async_save=async_save)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, data_state) -> None:
    """Starts saving (asynchronously for arrays); `wait()` blocks until it is on disk."""
    self._mngr.save(int(step), args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeSave(state), DATA: DataStateSave(data_state)}), force=True)

  def restore(self, step: int, abstract_state):
    """Restores `state` onto the shardings of `abstract_state`; returns (state, data_state)."""
    check_compatible(saved_state_shapes(self.directory, step), abstract_state,
                     where=f"checkpoint {self.directory}/{step}",
                     fix="use a fresh --workdir or the config that wrote it")
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        abstract_state)
    out = self._mngr.restore(int(step), args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
           DATA: DataStateRestore()}))
    return out[STATE], out[DATA]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


# ----------------------------------------------------------------------------- paths


def resolve(path) -> tuple[str, int]:
  """A run's workdir, its `checkpoints/` directory, or one step directory -> (directory, step).

  Raises ConfigError when there is no complete checkpoint there.
  """
  path = rundir.absolute(path).rstrip("/")
  candidates = [(rundir.join(path, CHECKPOINTS_DIR), None), (path, None)]
  base, _, name = path.rpartition("/")
  if name.isdigit():
    candidates.insert(0, (base, int(name)))
  for directory, step in candidates:
    folder = epath.Path(directory)
    if not folder.is_dir():
      continue
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / STATE).is_dir()]
    if step is not None and step in steps:
      return directory, step
    if step is None and steps:
      return directory, max(steps)
  raise ConfigError(f"no checkpoint found at {path!r} (expected a workdir, its checkpoints/ "
                    f"directory, or checkpoints/<step>)")


def saved_state_shapes(directory, step: int) -> dict[str, tuple]:
  """{'params/a/b': shape, ...} of the saved `state` item, read from metadata only."""
  mngr = _manager(directory, read_only=True)
  try:
    meta = mngr.item_metadata(int(step))[STATE]
  finally:
    mngr.close()
  if meta is None:
    raise ConfigError(f"{directory}/{step} has no readable '{STATE}' item")
  tree = getattr(meta, "tree", meta)
  return {name: tuple(m.shape) for name, m in trees.array_leaves(tree, sep="/")}


def check_compatible(saved: dict[str, tuple], abstract_tree, *, where: str, fix: str,
                     prefix: str = "") -> None:
  """Raises ConfigError naming the first entry whose presence or shape differs.

  `saved` maps path -> shape (from `saved_state_shapes`); `abstract_tree` is what the current
  config builds; `prefix` restricts the comparison to paths under it on the saved side (e.g.
  "params/" when only the params are loaded).
  """
  want = {prefix + name: tuple(leaf.shape)
          for name, leaf in trees.array_leaves(abstract_tree, sep="/")}
  have = {k: v for k, v in saved.items() if k.startswith(prefix)}
  # Params first: they explain the difference best (opt_state mirrors them).
  order = sorted(want, key=lambda k: (not k.startswith("params/"), k))
  for name in order:
    if name not in have:
      raise ConfigError(f"{where} does not fit this model: {name} is in the model "
                        f"(shape {want[name]}) but not in the checkpoint; {fix}")
    if have[name] != want[name]:
      raise ConfigError(f"{where} does not fit this model: {name} has shape {have[name]} in "
                        f"the checkpoint but {want[name]} in the model; {fix}")
  for name in sorted(have):
    if name not in want:
      raise ConfigError(f"{where} does not fit this model: {name} (shape {have[name]}) is in "
                        f"the checkpoint but not in the model; {fix}")


def load_state_items(path, abstract: dict, *, where: str) -> dict:
  """Some top-level entries of a saved state (e.g. {"params": ..., "moe_bias": ...}), checked
  against `abstract` (ShapeDtypeStructs with shardings) and restored onto those shardings."""
  directory, step = resolve(path)
  saved = saved_state_shapes(directory, step)
  for key, tree in abstract.items():
    check_compatible(saved, tree, where=f"{where} (checkpoint {directory}/{step})",
                     fix="the checkpoint was written by a different architecture",
                     prefix=f"{key}/")
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract)
  mngr = _manager(directory, read_only=True)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=dict(abstract), restore_args=restore_args, partial_restore=True)}))
  finally:
    mngr.close()
  return dict(out[STATE])


def load_params(path, abstract_params=None, *, where: str = "train.init_from"):
  """The params of the checkpoint at `path` (see `resolve`).

  With `abstract_params` (ShapeDtypeStructs carrying shardings) they are checked against the
  saved shapes and restored straight onto those shardings; without, they come back as host
  numpy arrays in the saved structure (for conversions such as upcycling, and for tests).
  """
  if abstract_params is not None:
    return load_state_items(path, {"params": abstract_params}, where=f"{where}={path!r}")["params"]
  directory, step = resolve(path)
  mngr = _manager(directory, read_only=True)
  try:
    meta = mngr.item_metadata(step)[STATE]
    meta = getattr(meta, "tree", meta)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
                                meta["params"])
    out = mngr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item={"params": meta["params"]}, restore_args={"params": restore_args},
        partial_restore=True)}))
  finally:
    mngr.close()
  return out[STATE]["params"]


def load_data_state(path):
  """The data-iterator state saved with the checkpoint at `path` (this process's)."""
  directory, step = resolve(path)
  mngr = _manager(directory, read_only=True)
  try:
    return mngr.restore(step, args=ocp.args.Composite(**{DATA: DataStateRestore()}))[DATA]
  finally:
    mngr.close()


# ----------------------------------------------------------------------------- preemption


class PreemptionGuard:
  """Turns SIGTERM into a request to stop after the current step.

  The training loop polls `requested()` between steps, saves a checkpoint and returns with
  status "preempted" (the process then exits with code 0). A second SIGTERM while the first is
  being handled gets the default behaviour (terminate). Signal handlers can only be installed
  from the main thread; elsewhere the guard is inert.
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    self._active = False

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._active = True
    return self

  def __exit__(self, *exc):
    if self._active:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      self._active = False
    return False

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

  def requested(self) -> bool:
    """True once any process got SIGTERM (all processes agree, so they save together)."""
    if jax.process_count() == 1:
      return self._flag
    flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
    return bool(np.any(flags))
