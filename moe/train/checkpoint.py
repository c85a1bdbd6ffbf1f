"""Checkpoints with Orbax: training state, data position, log window, integrity, resume.

A checkpoint is one directory per step under `workdir/checkpoints/<step>/` with these items:

- `state`: a pytree {step, params, opt_state, moe_bias, rng} (Orbax PyTree handler, sharded
  arrays written by every process, restored straight onto the target shardings, so a checkpoint
  written on one mesh restores onto another);
- `data`: each process's data-iterator state as JSON (`process_<i>-of-<n>.json`);
- `log`: the trainer's unlogged metrics window as JSON (so the first record after a resume
  averages the same steps as an uninterrupted run's); older checkpoints may lack it;
- `manifest.sha256.json`: the SHA-256 and size of every file of its items, written by process 0
  inside Orbax's temporary directory after all items are final and before Orbax renames it, so
  a committed step always carries its manifest.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; the temporary leftovers are deleted when the next
manager opens the directory. Only complete steps are listed.

Resume (`Checkpointer.restore_newest`) takes the newest step whose files match its manifest and
that restores; a damaged one (a file missing, cut, overwritten or with a flipped bit, unreadable
metadata) is moved aside to `checkpoints/damaged_<step>` with a one-line warning and the next
older one is tried; when none is left, a one-line `CheckpointError`. A step without a manifest
(written before manifests existed) is restored unverified. `prune` then deletes the oldest
steps beyond `train.keep_checkpoints` (a kill between a save and Orbax's own deletion leaves
one too many). A failed save (e.g. a full disk) is a one-line `CheckpointError`; the steps
before it stay usable. (Orbax 0.12's zarr3 format checksums only the shard index with crc32c,
not the chunk data, and its default zarr2/OCDBT format none: hence the manifest.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from absl import logging

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
LOG = "log"
MANIFEST = "manifest.sha256.json"
DAMAGED_PREFIX = "damaged_"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
# Step-level files Orbax (re)writes after the items are final (timestamps, commit marker): not
# covered by the manifest. Everything under the items is.
_UNHASHED = ("_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST)


class CheckpointError(ConfigError):
  """A checkpoint cannot be written (e.g. a full disk) or none left in the workdir is intact:
  one line; launch.py prints it as `error: ...` and exits 2."""


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


def _state_handler(reference_host_arrays: bool) -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler for the `state` item. With `reference_host_arrays`, numpy leaves are
  written uncompressed straight from the caller's memory (tensorstore references the array, no
  copy; for a synchronous save of numpy leaves nobody changes meanwhile, e.g. moe.convert's
  import). Orbax's default deep-copies every numpy leaf first (in case an asynchronous save's
  caller changes it) and zstd-encodes each chunk into a buffer held until its OCDBT data file
  (2 GiB) is written: twice the tree's bytes. Both are restored alike (zarr records the codec)."""
  if not reference_host_arrays:
    return ocp.PyTreeCheckpointHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)


def _manager(directory, *, keep: int | None = None, read_only: bool = False,
             async_save: bool = True, on_final=None,
             reference_host_arrays: bool = False) -> ocp.CheckpointManager:
  # Readers neither create the directory nor clean up another run's temporary directories.
  # `on_final` runs after every item of a step is written, before Orbax renames its directory.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(post_finalization_callback=on_final)
      if (on_final and async_save) else None)
  return ocp.CheckpointManager(
      rundir.absolute(directory), options=options,
      item_handlers={STATE: _state_handler(reference_host_arrays), DATA: DataStateHandler(),
                     LOG: ocp.JsonCheckpointHandler()})


def abstract_like(tree):
  """Arrays -> ShapeDtypeStruct with the same sharding (a restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- integrity


def _files(step_dir) -> list[str]:
  """The relative paths of the files under `step_dir` the manifest covers."""
  out, todo = [], [(epath.Path(step_dir), "")]
  while todo:  # epath has no recursive glob on remote paths: walk the folders
    folder, prefix = todo.pop()
    for p in folder.iterdir():
      rel = prefix + p.name
      if p.is_dir():
        todo.append((p, rel + "/"))
      elif rel not in _UNHASHED:
        out.append(rel)
  return sorted(out)


def _digest(path: epath.Path) -> tuple[int, str]:
  """(size, sha256) of a file, read in blocks."""
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
      size += len(block)
  return size, h.hexdigest()


def write_manifest(step_dir) -> None:
  """Records {relative path: [size, sha256]} of every file under `step_dir`."""
  root = epath.Path(step_dir)
  files = {rel: list(_digest(root / rel)) for rel in _files(step_dir)}
  rundir.write_json_atomic(root / MANIFEST, {"format": 1, "files": files}, default=None)


def verify(step_dir) -> str | None:
  """None when every file of the manifest is there with its size and hash (or when the step has
  no manifest: unverified), else what is wrong, in a few words."""
  root = epath.Path(step_dir)
  if not (root / MANIFEST).exists():
    return None
  try:
    files = json.loads((root / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its manifest is unreadable ({_first_line(e)})"
  for rel, (size, digest) in sorted(files.items()):
    path = root / rel
    if not path.is_file():
      return f"{rel} is missing"
    have_size, have_digest = _digest(path)
    if have_size != size:
      return f"{rel} has {have_size} bytes, not {size}"
    if have_digest != digest:
      return f"{rel} does not match its checksum"
  return None


# ----------------------------------------------------------------------------- manager


class Checkpointer:
  """The checkpoints of one run: `directory` holds one sub-directory per saved step."""

  def __init__(self, directory, *, keep: int | None = None, async_save: bool = True,
               reference_host_arrays: bool = False):
    """`reference_host_arrays` (with `async_save=False`, numpy leaves only): save writes the
    arrays from the caller's memory, uncompressed, holding no copy of them (`_state_handler`)."""
    if reference_host_arrays and async_save:
      raise ValueError("reference_host_arrays needs async_save=False")
    self.directory = rundir.absolute(directory)
    self.keep = keep
    self._async = async_save
    self._saving: int | None = None  # the step being written
    self._mngr = _manager(self.directory, keep=keep, async_save=async_save,
                          on_final=self._manifest_of_pending,
                          reference_host_arrays=reference_host_arrays)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def _manifest_of_pending(self) -> None:
    """Orbax's post-finalization callback: the step is complete in its temporary directory."""
    if jax.process_index() != 0 or self._saving is None:
      return
    folder = epath.Path(self.directory)
    pending = list(folder.glob(f"{self._saving}{_ORBAX_TMP}*"))  # local: renamed after this
    for step_dir in pending or [folder / str(self._saving)]:
      write_manifest(step_dir)

  def save(self, step: int, state, data_state, log_state=None) -> None:
    """Starts saving (asynchronously for arrays); `wait()` blocks until it is on disk.

    CheckpointError (one line) when this or the previous save failed (e.g. a full disk)."""
    self.wait()  # the previous save's errors surface here, naming its step
    items = {STATE: ocp.args.PyTreeSave(state), DATA: DataStateSave(data_state)}
    if log_state is not None:
      items[LOG] = ocp.args.JsonSave(log_state)
    self._saving = int(step)
    try:
      self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 - one line, whatever the storage layer raised
      raise self._save_error(e) from None
    if not self._async:
      self._manifest_of_pending()
      self._saving = None

  def _save_error(self, e: BaseException) -> CheckpointError:
    step, self._saving = self._saving, None
    done = [s for s in self.all_steps() if s != step]
    before = (f"the previous checkpoint (step {max(done)}) is intact" if done
              else "no earlier checkpoint exists")
    return CheckpointError(f"saving checkpoint {step} in {self.directory} failed ({_first_line(e)}"
                           f"); {before}: free space (or fix the error) and run the same command "
                           "again to resume")

  def restore(self, step: int, abstract_state):
    """Restores `state` onto the shardings of `abstract_state`; returns (state, data_state).

    `restore_with_log` also returns the saved log window (None when the step has none)."""
    state, data_state, _ = self.restore_with_log(step, abstract_state)
    return state, data_state

  def restore_with_log(self, step: int, abstract_state):
    check_compatible(saved_state_shapes(self.directory, step), abstract_state,
                     where=f"checkpoint {self.directory}/{step}",
                     fix="use a fresh --workdir or the config that wrote it")
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        abstract_state)
    items = {STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
             DATA: DataStateRestore()}
    has_log = rundir.isdir(rundir.join(self.directory, str(step), LOG))
    if has_log:
      items[LOG] = ocp.args.JsonRestore()
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return out[STATE], out[DATA], (out[LOG] if has_log else None)

  def restore_newest(self, abstract_state, check=None):
    """The newest intact step, restored: (step, state, data_state, log_state), or None when
    there is no checkpoint at all.

    `check(step)` (e.g. a compatibility check) runs first and may raise ConfigError, which is
    passed on: a checkpoint of another model is a user error, not damage. Damaged steps are
    moved aside (one-line warning each); CheckpointError when checkpoints existed but none is
    intact."""
    damaged = []
    for step in reversed(self.all_steps()):
      reason = verify(rundir.join(self.directory, str(step)))
      if reason is None:
        try:
          if check is not None:
            check(step)
          return (step, *self.restore_with_log(step, abstract_state))
        except CheckpointError:
          raise
        except ConfigError as e:
          if not _unreadable(e):
            raise
          reason = str(e)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the readers raise
          reason = _first_line(e)
      damaged.append(step)
      self._set_aside(step, reason)
    if damaged:
      raise CheckpointError(f"no intact checkpoint left in {self.directory} (damaged: "
                            f"{damaged}, moved to {DAMAGED_PREFIX}<step>); use a fresh --workdir "
                            "or remove the checkpoints to start over")
    return None

  def _set_aside(self, step: int, reason: str) -> None:
    src = rundir.join(self.directory, str(step))
    dst = rundir.join(self.directory, f"{DAMAGED_PREFIX}{step}")
    k = 1
    while rundir.exists(dst):
      k += 1
      dst = rundir.join(self.directory, f"{DAMAGED_PREFIX}{step}.{k}")
    logging.warning("checkpoint %s is damaged (%s): moved to %s, trying the previous one", src,
                    reason.splitlines()[0] if reason else "?", dst)
    if jax.process_index() == 0:
      epath.Path(src).rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._mngr.reload()

  def prune(self) -> None:
    """Deletes the oldest steps beyond `keep` (left by a kill between a save and Orbax's
    deletion of the oldest step)."""
    steps = self.all_steps()
    if self.keep is None or len(steps) <= self.keep:
      return
    for step in steps[:len(steps) - self.keep]:
      self._mngr.delete(step)

  def wait(self) -> None:
    """Blocks until the pending save is on disk; CheckpointError when it failed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(e) from None
    self._saving = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()


def _unreadable(e: ConfigError) -> bool:
  """A ConfigError that says a step's metadata could not be read (damage, not a user error)."""
  return "has no readable" in str(e)


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
