"""Reading a Hugging Face checkpoint's tensors by name, shared by every architecture's layout,
and the safetensors files themselves, read and written one tensor at a time.

`Tensors` wraps name -> array (any mapping; `SafetensorsFiles` reads a tensor only when `get`
asks for it, into an array of its own: plain reads at the header's offsets, no memory map) with one-line errors naming a missing, misshapen or non-float tensor, and tracks
which tensors an importer used (a tensor left over is an error in `moe.convert.cli`). Arrays keep
their stored dtype (bfloat16 as ml_dtypes.bfloat16): nothing is upcast, so importing a bfloat16
model holds at most the converted bfloat16 params plus the tensor being read (a memory-mapped
file would add every page read so far to the process's resident memory: the whole model).
`need(hf, key, where)` reads a required config.json field.

`write_safetensors(path, {name: array})` writes the format tensor by tensor (each array made
contiguous on its own, so transposed views cost one tensor's copy at a time, not the model's).
"""

from __future__ import annotations

import json
import os
import struct
import sys
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


# The header's dtype names numpy has types for (8-bit floats through ml_dtypes; `Tensors.get`
# refuses them as quantized).
_NP_DTYPES = {**{v: k for k, v in _ST_DTYPES.items()},
              "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
              "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_MAX_HEADER_BYTES = 100 << 20  # the format's own limit


def read_header(path: str) -> tuple[int, dict]:
  """(offset of the data, {name: {dtype, shape, data_offsets}}) of a .safetensors file (8 bytes
  little-endian header size, the JSON header, then the data), checked against the file's size;
  ConfigError naming the file when it is not one."""
  def bad(why: str) -> ConfigError:
    return ConfigError(f"{path}: not readable as safetensors ({why})")

  try:
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      head = f.read(8)
      if len(head) < 8:
        raise bad(f"{size} bytes, no header")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER_BYTES, size - 8):
        raise bad(f"header size {n} does not fit the file's {size} bytes")
      header = json.loads(f.read(n))
  except OSError as e:
    raise bad(_first_line(e)) from None
  except (ValueError, UnicodeDecodeError) as e:
    raise bad(f"header is not JSON: {_first_line(e)}") from None
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  header.pop("__metadata__", None)
  data = size - 8 - n
  for name, h in header.items():
    try:
      begin, end = (int(x) for x in h["data_offsets"])
      count = int(np.prod([int(d) for d in h["shape"]], dtype=np.int64))
      itemsize = _NP_DTYPES[h["dtype"]].itemsize if h["dtype"] in _NP_DTYPES else None
    except (KeyError, TypeError, ValueError):
      raise bad(f"tensor {name!r} has no dtype / shape / data_offsets") from None
    if not 0 <= begin <= end <= data or (itemsize and end - begin != count * itemsize):
      raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not fit its shape "
                f"{h['shape']} ({h['dtype']}) and the file's {data} data bytes")
  return 8 + n, header


class SafetensorsFiles(Mapping):
  """name -> array over several .safetensors files, in its stored dtype (bfloat16 as
  ml_dtypes.bfloat16). Opening reads the headers (`read_header`); a tensor is read from disk
  into its own new array when it is looked up (each lookup reads it again), with plain reads,
  not a memory map: the process holds that array only, not the file's pages (a mapped file's
  pages read so far count as its resident memory). `reads` counts the lookups."""

  def __init__(self, paths: list[str]):
    self._files, self._where = [], {}
    self.reads = 0
    for path in paths:
      start, header = read_header(path)
      self._files.append((path, start, open(path, "rb", buffering=0)))  # noqa: SIM115
      for name, h in header.items():
        self._where[name] = (len(self._files) - 1, h)

  def __getitem__(self, name: str) -> np.ndarray:
    index, h = self._where[name]
    path, start, f = self._files[index]
    self.reads += 1
    if h["dtype"] not in _NP_DTYPES:
      raise ConfigError(f"{path}: tensor {name!r} has dtype {h['dtype']}, which numpy has no "
                        "type for (quantized checkpoints are not read)")
    x = np.empty([int(d) for d in h["shape"]], _NP_DTYPES[h["dtype"]])
    buf = memoryview(x.reshape(-1).view(np.uint8))
    begin, end = (int(v) for v in h["data_offsets"])
    done = 0
    try:
      while done < end - begin:
        got = os.preadv(f.fileno(), [buf[done:]], start + begin + done)
        if got == 0:
          raise OSError(f"the file ends {end - begin - done} bytes early")
        done += got
    except OSError as e:
      raise ConfigError(f"{path}: tensor {name!r} is not readable ({_first_line(e)})") from None
    if sys.byteorder != "little":  # the format is little-endian
      x = x.byteswap()
    return x

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name) -> bool:
    return name in self._where

  def close(self) -> None:
    """Closes the files; arrays already read stay valid."""
    for _, _, f in self._files:
      f.close()
    self._files = []


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
