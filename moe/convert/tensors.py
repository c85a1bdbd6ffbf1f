"""Reading a Hugging Face checkpoint's tensors by name, shared by every architecture's layout,
and the safetensors files themselves, read and written one tensor at a time.

`Tensors` wraps name -> array (any mapping; `SafetensorsFiles` reads a tensor only when `get`
asks for it) with one-line errors naming a missing, misshapen or non-float tensor, and tracks
which tensors an importer used (a tensor left over is an error in `moe.convert.cli`). Arrays keep
their stored dtype (bfloat16 as ml_dtypes.bfloat16): nothing is upcast, so importing a bfloat16
model holds at most the converted bfloat16 params plus the tensor being read.
`need(hf, key, where)` reads a required config.json field.

`write_safetensors(path, {name: array})` writes the format tensor by tensor (each array made
contiguous on its own, so transposed views cost one tensor's copy at a time, not the model's).
"""

from __future__ import annotations

import json
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from moe import rundir
from moe.errors import ConfigError

# Floating dtypes a checkpoint tensor may have (kept as stored).
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16),
                np.dtype(np.float64))
# numpy dtype -> the safetensors header's name.
_ST_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
              np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
              np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
              np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64"}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class SafetensorsFiles(Mapping):
  """name -> array over several .safetensors files, opened with `safetensors.safe_open(path,
  "numpy")`: a tensor is read from disk when it is looked up (each lookup reads it again), in
  its stored dtype. `reads` counts the lookups."""

  def __init__(self, paths: list[str]):
    from safetensors import safe_open
    self._handles, self._where = [], {}
    self.reads = 0
    for path in paths:
      try:
        h = safe_open(path, "numpy")
        names = list(h.keys())
      except Exception as e:  # noqa: BLE001 - the Rust reader's errors have no common base class
        raise ConfigError(f"{path}: not readable as safetensors ({_first_line(e)})") from None
      self._handles.append((path, h))
      for name in names:
        self._where[name] = len(self._handles) - 1

  def __getitem__(self, name: str) -> np.ndarray:
    path, h = self._handles[self._where[name]]
    self.reads += 1
    try:
      return h.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - e.g. a dtype numpy has no type for (F8_*)
      raise ConfigError(f"{path}: tensor {name!r} is not readable ({_first_line(e)})") from None

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name) -> bool:
    return name in self._where

  def close(self) -> None:
    """Drops the file handles (and their memory maps: the pages read so far count as resident
    memory while they are mapped); arrays already read are copies and stay valid."""
    self._handles = []


class Tensors:
  """Name -> array in its stored dtype, with one-line errors naming a missing, misshapen or
  non-float tensor; tracks what was used."""

  def __init__(self, tensors: Mapping[str, np.ndarray], where: str):
    self._t = tensors
    self.where = where
    self.used: set[str] = set()

  def __contains__(self, name):
    return name in self._t

  def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
    if name not in self._t:
      raise ConfigError(f"{self.where}: tensor {name!r} is missing from the safetensors files")
    x = np.asarray(self._t[name])
    if x.dtype not in FLOAT_DTYPES:
      raise ConfigError(f"{self.where}: tensor {name!r} has dtype {x.dtype}; expected one of "
                        f"{', '.join(str(d) for d in FLOAT_DTYPES)} (quantized checkpoints are "
                        "not read)")
    if shape is not None and tuple(x.shape) != tuple(shape):
      raise ConfigError(f"{self.where}: tensor {name!r} has shape {tuple(x.shape)}, config.json "
                        f"implies {tuple(shape)}")
    self.used.add(name)
    return x

  def unused(self) -> list[str]:
    return sorted(set(self._t) - self.used)


def need(hf: dict, key: str, where: str):
  if key not in hf or hf[key] is None:
    raise ConfigError(f"{where}: config.json has no {key!r}")
  return hf[key]


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None,
                      dtype=None) -> None:
  """Writes `tensors` (numpy arrays or views, bfloat16 included) as one .safetensors file,
  replacing `path` (local or remote) atomically; metadata values are written as text. `dtype`:
  cast every floating tensor to it (one tensor at a time), else each keeps its own."""
  cast = np.dtype(dtype) if dtype is not None else None

  def final_dtype(a):
    d = np.asarray(a).dtype if not hasattr(a, "dtype") else np.dtype(a.dtype)
    return cast if cast is not None and d in FLOAT_DTYPES else d

  header, offset = {}, 0
  for name, a in tensors.items():
    d = final_dtype(a)
    if d not in _ST_DTYPES:
      raise ConfigError(f"{path}: tensor {name!r} has dtype {d}, which safetensors cannot hold")
    size = int(np.prod(np.shape(a), dtype=np.int64)) * d.itemsize
    header[name] = {"dtype": _ST_DTYPES[d], "shape": [int(s) for s in np.shape(a)],
                    "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with rundir.replacing(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for name, a in tensors.items():
        x = np.ascontiguousarray(np.asarray(a), dtype=final_dtype(a))
        f.write(x.reshape(-1).view(np.uint8).data if x.size else b"")
