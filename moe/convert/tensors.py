"""Reading a Hugging Face checkpoint's tensors by name, shared by every architecture's layout.

`Tensors` wraps name -> array with one-line errors naming a missing or misshapen tensor and
tracks which tensors an importer used (a tensor left over is an error in `moe.convert.cli`);
`need(hf, key, where)` reads a required config.json field.
"""

from __future__ import annotations

import numpy as np

from moe.errors import ConfigError


class Tensors:
  """Name -> float32 array, with one-line errors naming a missing tensor; tracks what was used."""

  def __init__(self, tensors: dict[str, np.ndarray], where: str):
    self._t = tensors
    self.where = where
    self.used: set[str] = set()

  def __contains__(self, name):
    return name in self._t

  def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
    if name not in self._t:
      raise ConfigError(f"{self.where}: tensor {name!r} is missing from the safetensors files")
    x = np.asarray(self._t[name], np.float32)
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
