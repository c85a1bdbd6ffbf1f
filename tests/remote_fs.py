"""A fake `gs://` filesystem for tests: every `gs://<bucket>/<key>` lives in a local folder.

`mock_gcs(root)` (a context manager; the `remote_fs` fixture in conftest.py wraps it) redirects
everything the project reaches a remote path through, without a network:

- `etils.epath` (moe.rundir, moe.train.checkpoint, Orbax's directory handling): the `gs` scheme
  gets a backend that maps `gs://b/k` to `<root>/b/k` and maps results back (glob, walk);
- Orbax's TensorStore array writes, which use TensorStore's own `gcs` kvstore driver: the kvstore
  spec Orbax builds for a `gs://` path (`gcs_utils.get_kvstore_for_gcs`) becomes a `file` spec on
  the mapped folder, and Orbax's bucket queries (hierarchical namespace) answer "no";
- CLU's TensorBoard writers (TensorFlow's own filesystem layer): their log folder is mapped.

Orbax still takes its GCS code paths (commit-file instead of rename atomicity, no parallel
deleter), which is what a real bucket would exercise. `stray_gs_entries(*folders)` lists local
files or folders named `gs:` (what `os.path.abspath("gs://b/x")` makes), to check that nothing
took a remote path for a local one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator
from unittest import mock

from etils.epath import backend as epath_backend
from etils.epath import gpath

PREFIX = "gs://"


@dataclasses.dataclass(eq=False)
class MappedGcsBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """epath's local backend, with `gs://<bucket>/<key>` read as `<root>/<bucket>/<key>`."""

  root: str = ""

  def local(self, path) -> str:
    path = os.fspath(path)
    if not path.startswith(PREFIX):
      return path
    return os.path.join(self.root, path[len(PREFIX):])

  def remote(self, path: str) -> str:
    rel = os.path.relpath(path, self.root)
    return path if rel.startswith("..") else PREFIX + rel.replace(os.sep, "/")

  def open(self, path, mode):
    local = self.local(path)
    if local != os.fspath(path) and ("w" in mode or "a" in mode):
      os.makedirs(os.path.dirname(local), exist_ok=True)  # a bucket has no folders to create
    return super().open(local, mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.remote(p) for p in super().glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for folder, dirs, files in super().walk(self.local(top), top_down=top_down,
                                            on_error=on_error):
      yield self.remote(os.fspath(folder)), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    kwargs = {} if mode is None else {"mode": mode}
    return super().makedirs(self.local(path), exist_ok=exist_ok, **kwargs)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    kwargs = {} if mode is None else {"mode": mode}
    return super().mkdir(self.local(path), exist_ok=exist_ok, **kwargs)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def rename(self, path, dst):
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, *, overwrite):
    return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


@dataclasses.dataclass
class RemoteFs:
  """What the fixture yields: `url(name)` -> "gs://<bucket>/<name>"; `local(url)` -> the folder
  it lives in."""

  root: str
  bucket: str
  backend: MappedGcsBackend

  def url(self, *names: str) -> str:
    return "/".join((PREFIX + self.bucket,) + names)

  def local(self, url: str) -> str:
    return self.backend.local(url)


@contextlib.contextmanager
def mock_gcs(root: str, bucket: str = "bucket") -> Iterator[RemoteFs]:
  """Redirects `gs://` to `root` (module docstring) while the context is open."""
  from orbax.checkpoint._src.path import gcs_utils
  backend = MappedGcsBackend(root=root)
  os.makedirs(os.path.join(root, bucket), exist_ok=True)

  def kvstore(path: str) -> dict:
    return {"driver": "file", "path": backend.local(path)}

  prefix_to_backend = {**gpath._PREFIX_TO_BACKEND, "gs": backend}  # pylint: disable=protected-access
  patches = [
      mock.patch.object(gpath, "_PREFIX_TO_BACKEND", prefix_to_backend),
      # epath picks tf.io.gfile for URIs when TensorFlow is installed: keep it on ours.
      mock.patch.object(gpath, "_is_tf_installed", lambda: False),
      # A local <-> gs:// copy or rename goes to the gs:// side's backend.
      mock.patch.object(gpath, "_GCS_BACKENDS", gpath._GCS_BACKENDS | {backend}),  # pylint: disable=protected-access
      mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore),
      mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False),
  ]
  try:
    from clu import metric_writers
  except ImportError:  # only the training extras bring CLU
    metric_writers = None
  if metric_writers is not None:
    for name in ("create_default_writer", "SummaryWriter"):
      original = getattr(metric_writers, name)
      patches.append(mock.patch.object(metric_writers, name, _mapped_logdir(original, backend)))
  with contextlib.ExitStack() as stack:
    for p in patches:
      stack.enter_context(p)
    yield RemoteFs(root=root, bucket=bucket, backend=backend)


def _mapped_logdir(original, backend: MappedGcsBackend):
  def call(logdir=None, *args, **kwargs):
    return original(backend.local(logdir) if logdir is not None else logdir, *args, **kwargs)
  return call


def stray_gs_entries(*folders: str, max_depth: int = 6) -> list[str]:
  """Paths under `folders` (to `max_depth` levels) named `gs:`: a remote path used as a local
  one."""
  found = []
  for top in folders:
    top = os.path.abspath(top)
    for folder, dirs, files in os.walk(top):
      depth = os.path.relpath(folder, top).count(os.sep)
      found += [os.path.join(folder, n) for n in dirs + files if n.startswith("gs:")]
      if depth >= max_depth:
        dirs[:] = []
      dirs[:] = [d for d in dirs if d not in (".git", ".venv", "node_modules", "__pycache__")]
  return found
