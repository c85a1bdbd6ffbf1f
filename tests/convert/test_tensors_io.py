"""Import's memory-bounded plumbing, without PyTorch: safetensors read tensor by tensor with
plain reads (bit-equal to the `safetensors` package, no memory map left behind, one-line errors
for a damaged file), experts stacked in place, and the checkpoint written from the caller's
numpy arrays (`reference_host_arrays`) restoring bit-equal in its dtype."""

from __future__ import annotations

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import one_line_error
from moe.convert import decoder
from moe.convert import tensors as tensors_lib
from moe.train import checkpoint as ckpt_lib


def _arrays(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"w.bf16": rng.standard_normal((5, 7), np.float32).astype(ml_dtypes.bfloat16),
          "w.f32": rng.standard_normal((3, 4, 2), np.float32),
          "w.f16": rng.standard_normal(6).astype(np.float16),
          "ids": np.arange(9, dtype=np.int64).reshape(3, 3), "empty": np.zeros((0, 4), np.float32),
          "scalar": np.asarray(2.5, np.float32)}


def test_files_read_bit_equal_to_the_package_without_a_memory_map(tmp_path):
  paths = [str(tmp_path / f"model-{i}.safetensors") for i in range(2)]
  for i, path in enumerate(paths):
    save_file({f"f{i}.{k}": v for k, v in _arrays(i).items()}, path, metadata={"format": "pt"})
  want = {**load_file(paths[0]), **load_file(paths[1])}
  files = tensors_lib.SafetensorsFiles(paths)
  assert files.reads == 0 and set(files) == set(want) and "f1.ids" in files
  for name in sorted(want):
    x = files[name]
    assert x.dtype == want[name].dtype and x.shape == want[name].shape, name
    assert x.tobytes() == want[name].tobytes(), name
    assert x.flags.owndata and x.flags.writeable, name  # an array of its own
  assert files.reads == len(want)
  if os.path.exists("/proc/self/maps"):  # read, not mapped: no page of the files is resident
    maps = open("/proc/self/maps").read()
    assert not any(p in maps for p in paths)
  files.close()


def _file_with(tmp_path, header: dict, data: bytes, name="x.safetensors") -> str:
  raw = json.dumps(header).encode()
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data)
  return path


def test_damaged_files_are_one_line_errors_naming_them(tmp_path):
  good = str(tmp_path / "good.safetensors")
  save_file({"a": np.ones((4, 4), np.float32)}, good)
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(open(good, "rb").read()[:-5])
  with one_line_error("cut.safetensors", "'a'", "do not fit"):
    tensors_lib.SafetensorsFiles([str(cut)])
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"not a safetensors file at all")
  with one_line_error("junk.safetensors", "not readable as safetensors"):
    tensors_lib.SafetensorsFiles([str(junk)])
  short = _file_with(tmp_path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
                     bytes(12), "short.safetensors")
  with one_line_error("short.safetensors", "'a'", "[4]"):  # 12 bytes for 4 float32
    tensors_lib.SafetensorsFiles([short])
  odd = _file_with(tmp_path, {"q": {"dtype": "I4", "shape": [2], "data_offsets": [0, 1]},
                              "f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [1, 3]}},
                   bytes(3), "odd.safetensors")
  files = tensors_lib.SafetensorsFiles([odd])  # opens: the dtypes matter when read
  with one_line_error("odd.safetensors", "'q'", "I4"):
    files["q"]
  with one_line_error("'f8'", "float8_e4m3fn", "quantized"):
    tensors_lib.Tensors(files, "here").get("f8")


def test_experts_are_stacked_in_place_in_their_common_dtype():
  D, F, E = 4, 3, 2
  rng = np.random.default_rng(0)
  src = {}
  for e in range(E):
    for theirs, shape in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
      x = rng.standard_normal(shape, np.float32)
      src[f"m.experts.{e}.{theirs}.weight"] = x.astype(ml_dtypes.bfloat16) if e == 0 else x
  out = decoder.import_experts(tensors_lib.Tensors(src, "here"), "m.", D, E, F)
  assert {k: v.shape for k, v in out.items()} == {"w_gate": (E, D, F), "w_in": (E, D, F),
                                                 "w_out": (E, F, D)}
  assert {v.dtype for v in out.values()} == {np.dtype(np.float32)}  # as np.stack promotes
  for e in range(E):
    np.testing.assert_array_equal(out["w_out"][e],
                                  src[f"m.experts.{e}.down_proj.weight"].T.astype(np.float32))


def test_checkpoint_written_from_the_callers_arrays_restores_bit_equal(tmp_path):
  rng = np.random.default_rng(1)
  params = {"a": {"kernel": rng.standard_normal((6, 5), np.float32).astype(ml_dtypes.bfloat16)},
            "b": rng.standard_normal((4,), np.float32)}
  before = jax.tree.map(np.copy, params)
  directory = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(directory, keep=None, async_save=False, reference_host_arrays=True)
  ck.save(0, {"step": np.zeros((), np.int32), "params": params}, {})
  ck.close()
  assert ckpt_lib.verify(os.path.join(directory, "0")) is None  # manifest written and matching
  back = ckpt_lib.load_params(directory)
  for got, want, kept in zip(jax.tree.leaves(back), jax.tree.leaves(before),
                             jax.tree.leaves(params)):
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert kept.tobytes() == want.tobytes()  # the caller's arrays are left as they were
  with pytest.raises(ValueError, match="async_save=False"):
    ckpt_lib.Checkpointer(str(tmp_path / "other"), reference_host_arrays=True)
