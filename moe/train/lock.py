"""One training run per workdir: an exclusive `fcntl.flock` on `workdir/.lock`.

The lock belongs to the open file, so the operating system releases it when the process ends in
any way (exit, crash, SIGKILL): a killed run never leaves a stale lock behind, and the same
command simply takes it again. A second run on the same workdir is refused with one line naming
the holder's process id (written into the lock file). Only process 0 of a multi-process run
takes it (the other processes write no run files but their checkpoint shards, which the
coordinator orders). `flock` works on local file systems; on NFS it depends on the mount, and a
workdir that is not a local path (e.g. `gs://...`) is not locked at all (a warning says so):
there, make sure one job owns a workdir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Iterator

from absl import logging

from moe.errors import ConfigError
from moe.rundir import LOCK_FILE


@contextlib.contextmanager
def workdir_lock(workdir: str, *, primary: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the body; ConfigError (one line) when another run holds it."""
  workdir = os.fspath(workdir)
  if not primary:
    yield
    return
  if "://" in workdir:
    logging.warning("--workdir=%s is not a local path: it is not locked against a second run",
                    workdir)
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
      raise ConfigError(f"--workdir={workdir} is in use by another training run (process "
                        f"{holder} holds {path}); wait for it to end or use another --workdir"
                        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
