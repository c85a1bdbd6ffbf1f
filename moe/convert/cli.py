r"""Convert Hugging Face checkpoints to this project's format and back.

  python -m moe.convert --from_hf=DIR --to=WORKDIR      # GPT-2, Mixtral, DeepSeek -> ours
  python -m moe.convert --from=WORKDIR --to_hf=DIR      # our checkpoint -> a HF folder (layouts.export_type)
        [--dtype=bfloat16|float32]                      # default: each tensor as stored
        [--config=configs/x.py --config.moe.num_experts=4]   # when WORKDIR has no config.json

Flags and the config file are read like launch.py's (`moe.cli`: absl flags, `--config=path[:arg]`,
`--config.<field>=<value>` overrides, one-line errors). Export takes the `model` and `moe` groups
from the run's `config.json` (every run writes it, `moe.runconfig`); a `--config` given as well
must agree with it in those groups.

Import reads a local folder (`config.json` + `*.safetensors`, read by `moe.convert.tensors`
one tensor at a time into an array of its own, in its stored dtype, no memory map: no PyTorch):
a bfloat16 model stays bfloat16 in the checkpoint (training, evaluation and generation restore
params as float32). Peak host memory is the converted params plus about one converted tensor
(a stack of experts is filled expert by expert): the checkpoint is written straight from the
params' numpy arrays, uncompressed (`Checkpointer(reference_host_arrays=True)`; Orbax's default
would deep-copy every numpy leaf and hold its zstd-encoded chunks until the 2 GiB OCDBT data
file is written, twice the params), so it takes the safetensors' size on disk (measured in
README.md, `experiments/convert_memory.py`). Export restores the params (as host arrays) and
writes `model.safetensors` tensor by tensor in the checkpoint's dtype (`--dtype` casts). It
writes into WORKDIR:

- `checkpoints/0/`: a checkpoint in the format `moe/checkpoint.py` saves (state item with `step`,
  `params` and, when the model has one, the `moe_bias` collection (DeepSeek-V3's correction
  bias); no optimizer state; data item empty), so
  `launch.py --mode=complete --workdir=WORKDIR` and `--config.train.init_from=WORKDIR` load it;
- `config.json`: the `model` and `moe` config groups that describe the architecture, plus where
  it came from; `config.py`: a config file for launch.py (configs/default.py with those groups),
  used as `--config=WORKDIR/config.py` (and taken by launch.py / export when `--workdir` /
  `--from` names WORKDIR and no `--config` is given);
- `hf_tokenizer/`: the folder's `tokenizer.json` (+ tokenizer_config.json etc.) and its special
  token ids when present (`moe.convert.tokenizer_files`); `config.py` then sets
  `data.tokenizer="hf:<that folder>"`, so fine-tuning tokenizes its data with it, and
  `moe.inference.generate` uses it.

Supported architectures: see `moe.convert.layouts.SUPPORTED` (one module per family); anything else is a one-line error
naming `model_type` / `architectures`. Export writes `config.json` + `model.safetensors` that
`transformers.AutoModelForCausalLM` loads (`layouts.export_type` picks the type, e.g. Mixtral or
DeepSeek-V3/V2; the checkpoint's `moe_bias` travels as DeepSeek-V3's correction bias), plus the
run's tokenizer and a `generation_config.json` (`moe.convert.tokenizer_files`). Hugging Face
routes dropless: a model trained with a capacity factor computes the same except where it dropped
tokens.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys

from absl import flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from safetensors.numpy import load_file

from moe import cli
from moe import runconfig
from moe.convert import layouts
from moe.convert import tensors as tensors_lib
from moe.convert import tokenizer_files
from moe.errors import ConfigError
from moe.layer.config import MoeConfig
from moe.model.config import ModelConfig, model_config_from, validate_model
from moe.model.transformer import Transformer, param_shapes
from moe import trees
from moe import rundir
from moe.rundir import CHECKPOINTS_DIR, CONFIG_FILE, write_json_atomic
from moe.train import checkpoint as ckpt_lib

CONFIG_JSON = "config.json"  # a Hugging Face model folder's; our workdir's is CONFIG_FILE
CONFIG_PY = runconfig.CONVERTED_CONFIG_PY


# ----------------------------------------------------------------------------- safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (bfloat16 as ml_dtypes.bfloat16),
  through the `safetensors` package's numpy front end; an unreadable file is a one-line
  ConfigError naming it."""
  try:
    return dict(load_file(path))
  except Exception as e:  # noqa: BLE001 - the Rust reader's errors have no common base class
    first = str(e).splitlines()[0] if str(e) else ""
    raise ConfigError(f"{path}: not readable as safetensors ({type(e).__name__}: "
                      f"{first})") from None


write_safetensors = tensors_lib.write_safetensors  # tensor by tensor, see moe.convert.tensors

EXPORT_DTYPES = ("bfloat16", "float32")  # --dtype


def read_hf_folder(folder: str) -> tuple[dict, tensors_lib.SafetensorsFiles]:
  """(config.json, the tensors of every *.safetensors file, read when looked up) of a local HF
  model folder."""
  if rundir.is_remote(folder):
    raise ConfigError(f"--from_hf={folder}: give a local folder (the safetensors files are "
                      "read with local file reads); copy the model down first")
  cfg_path = os.path.join(folder, CONFIG_JSON)
  if not os.path.isfile(cfg_path):
    raise ConfigError(f"--from_hf={folder}: no config.json there (expected a Hugging Face model "
                      "folder saved with save_pretrained)")
  try:
    hf = rundir.load_json(cfg_path, "--from_hf: the model's config")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise ConfigError(f"--from_hf={folder}: no *.safetensors files (PyTorch .bin checkpoints are "
                      "not read: re-save with save_pretrained(safe_serialization=True))")
  return hf, tensors_lib.SafetensorsFiles(files)


def architecture(hf: dict, where: str) -> str:
  mt = hf.get("model_type")
  if mt in layouts.IMPORTERS:
    return mt
  supported = ", ".join(f"{k} ({v})" for k, v in layouts.SUPPORTED.items())
  raise ConfigError(f"{where}: model_type={mt!r} (architectures={hf.get('architectures')}) is "
                    f"not supported; supported: {supported}")


# ----------------------------------------------------------------------------- import


def _config_py(repo_relative_note: str) -> str:
  return f'''"""Config of a checkpoint converted by moe.convert ({repo_relative_note}).

configs/default.py with the `model` and `moe` groups of config.json beside this file.
  python launch.py --config=<this file> --workdir=<this folder> --mode=complete --prompt='...'
  python launch.py --config=<this file> --workdir=runs/ft --config.train.init_from=<this folder>
"""

import json
import os

from configs import default


def get_config():
  c = default.get_config()
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as f:
    spec = json.load(f)
  for group in ("model", "moe"):
    for key, value in spec[group].items():
      c[group][key] = value
  c.data.seq_len = min(c.data.seq_len, c.model.max_len)
  tokenizer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_tokenizer")
  if os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):  # the model's own tokenizer
    c.data.tokenizer = "hf:" + tokenizer
  return c
'''


def model_groups(model: dict, moe: dict | None) -> dict:
  """The `model` / `moe` config groups (every field given, so defaults cannot leak in)."""
  m = {f.name: getattr(ModelConfig(), f.name) for f in dataclasses.fields(ModelConfig)
       if f.name != "moe"}
  m.update(model)
  if moe is None:
    g = {"enabled": False}
  else:
    g = {f.name: getattr(MoeConfig(), f.name) for f in dataclasses.fields(MoeConfig)}
    g.update(moe)
    g["enabled"] = True
  return {"model": m, "moe": g}


def save_checkpoint(workdir: str, params, moe_bias=None) -> str:
  """Writes `params` (and the `moe_bias` collection, when not empty) as step 0 in
  `workdir/checkpoints` (moe.train.checkpoint's format), each param in its own dtype (loading
  for training casts to the model's float32), straight from the params' arrays (no copy of
  them; uncompressed): they must not change until this returns."""
  directory = rundir.join(workdir, CHECKPOINTS_DIR)
  if rundir.isdir(directory) and any(p.name.isdigit() for p in epath.Path(directory).iterdir()):
    raise ConfigError(f"--to={workdir} already holds checkpoints; convert into a fresh folder")
  state = {"step": np.zeros((), np.int32),
           "params": jax.tree.map(np.asarray, params)}
  if moe_bias:
    state["moe_bias"] = jax.tree.map(lambda x: np.asarray(x, np.float32), moe_bias)
  ck = ckpt_lib.Checkpointer(directory, keep=None, async_save=False, reference_host_arrays=True)
  ck.save(0, state, {})
  ck.close()
  return directory


def _contiguous(tree: dict) -> None:
  """Each array of `tree` made C-contiguous in place, one at a time (a transposed view and its
  copy are both alive only for that tensor), so the checkpoint writer copies nothing more."""
  for key, value in tree.items():
    if isinstance(value, dict):
      _contiguous(value)
    else:
      tree[key] = np.ascontiguousarray(value)


def from_hf(folder: str, workdir: str) -> dict:
  """Imports a HF folder into `workdir`; returns the config.json written."""
  hf, tensors = read_hf_folder(folder)
  arch = architecture(hf, f"--from_hf={folder}")
  t = layouts.Tensors(tensors, f"--from_hf={folder} ({arch})")
  model, moe, params, *bias = layouts.IMPORTERS[arch](hf, t)
  moe_bias = bias[0] if bias else {}
  tensors.close()  # every tensor is read
  _contiguous(params)
  left = t.unused()
  if left:
    raise ConfigError(f"--from_hf={folder}: {len(left)} tensor(s) have no place in the "
                      f"converted model, e.g. {left[0]!r}")
  spec = model_groups(model, moe)
  # The config must describe exactly these params (checked before anything is written).
  mc = model_config_from(ml_collections.ConfigDict(spec))
  validate_model(mc)
  want = {k: tuple(v.shape) for k, v in trees.flatten(param_shapes(mc), sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in trees.flatten(params, sep="/").items()}
  want.update({f"moe_bias/{k}": tuple(v.shape)
               for k, v in trees.flatten(_bias_shapes(mc), sep="/").items()})
  have.update({f"moe_bias/{k}": tuple(np.shape(v))
               for k, v in trees.flatten(moe_bias, sep="/").items()})
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[0]
    raise ConfigError(f"--from_hf={folder}: internal mismatch between converted params and the "
                      f"model ({diff[0]}: {have.get(diff[0])} vs {want.get(diff[0])})")
  rundir.makedirs(workdir)
  save_checkpoint(workdir, params, moe_bias)
  spec["source"] = {"from_hf": rundir.absolute(folder), "model_type": arch,
                    "architectures": hf.get("architectures"),
                    "bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id")}
  write_json_atomic(rundir.join(workdir, CONFIG_FILE), spec, default=None)
  rundir.write_text_atomic(rundir.join(workdir, CONFIG_PY), _config_py(f"from {arch}"))
  tokenizer_files.import_tokenizer(folder, hf, workdir)
  return spec


# ----------------------------------------------------------------------------- export


def _groups_of(workdir: str, cfg) -> dict:
  """The `model` / `moe` groups: of `cfg` (a ConfigDict, or a config file's path) when given,
  which must then agree with the run's config.json, else of that config.json."""
  path = rundir.join(workdir, CONFIG_FILE)
  if cfg is not None:
    if isinstance(cfg, str):
      cfg = cli.load_config_file(cfg)
    runconfig.check_saved(cfg, workdir, runconfig.EVAL_MAY_CHANGE,
                          groups=runconfig.ARCHITECTURE_GROUPS)
    return {"model": cfg.model.to_dict(), "moe": cfg.moe.to_dict()}
  if rundir.exists(path):
    spec = _read_config_json(path)
    if "model" in spec and "moe" in spec:
      return {"model": spec["model"], "moe": spec["moe"]}
  raise ConfigError(f"--from={workdir}: no config.json with `model` and `moe` groups there; "
                    "pass --config=<the config file the run was trained with>")


def to_hf(workdir: str, out_dir: str, cfg=None, dtype: str | None = None,
          report: list | None = None) -> dict:
  """Exports the newest checkpoint in `workdir` as a Hugging Face folder of the type
  `layouts.export_type` picks, with the run's tokenizer; returns its config.json.
  `cfg`: the run's config (a ConfigDict or a config file) when `workdir` has no config.json;
  `dtype`: "bfloat16" | "float32" to cast the weights to (default: as stored); `report`, when
  given, gets a line saying which tokenizer was written."""
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ConfigError(f"--dtype={dtype!r} must be one of {', '.join(EXPORT_DTYPES)} (or left out "
                      "to keep the checkpoint's)")
  try:
    ckpt_lib.resolve(workdir)
  except ConfigError:
    raise ConfigError(f"no checkpoint in {workdir}") from None
  groups = _groups_of(workdir, cfg)
  model, moe = dict(groups["model"]), dict(groups["moe"])
  params = ckpt_lib.load_params(workdir)
  scale = moe.get("router_logit_scale", 1.0)
  if scale != 1.0:  # logits = scale * (x @ W) = x @ (scale * W): folded into the router kernels
    params = _fold_router_scale(params, scale)
    moe["router_logit_scale"] = 1.0
  if model.get("vocab_size", -1) in (-1, 0, None):
    model["vocab_size"] = int(np.shape(params["embedding_table"])[0])
  hf_type = layouts.export_type(model, moe)
  moe_bias = _load_moe_bias(workdir)
  if model.get("scan_layers"):
    block = lambda i: _with_bias(_index(params["blocks"], i),  # noqa: E731
                                 _index(moe_bias["blocks"], i) if moe_bias else None)
  else:
    block = lambda i: _with_bias(params[f"block_{i}"], moe_bias.get(f"block_{i}"))  # noqa: E731
  top = {k: v for k, v in params.items() if not k.startswith("block")}
  config, tensors = layouts.EXPORTERS[hf_type](model, moe, block, top)
  source = rundir.join(workdir, CONFIG_FILE)
  run_config = _read_config_json(source) if rundir.exists(source) else {}
  if cfg is not None and not isinstance(cfg, str) and "data" in cfg:
    run_config = {**run_config, "data": cfg.data.to_dict()}
  rundir.makedirs(out_dir)
  what = tokenizer_files.export_tokenizer(workdir, run_config, out_dir, config)
  if report is not None:
    report.append(what)
  if dtype is not None:
    config["dtype"] = dtype
  else:
    sizes = {}  # the dtype holding most of the weights (a float32 correction bias aside)
    for t in tensors.values():
      sizes[str(t.dtype)] = sizes.get(str(t.dtype), 0) + int(np.size(t))
    config["dtype"] = max(sizes, key=sizes.get) if sizes else "float32"
  write_safetensors(rundir.join(out_dir, "model.safetensors"), tensors, {"format": "pt"},
                    dtype=dtype)
  write_json_atomic(rundir.join(out_dir, CONFIG_JSON), config, indent=1, default=None)
  return config


def _fold_router_scale(tree, scale: float):
  """`tree` with every router kernel (a `router` dict's `kernel`) multiplied by `scale`, in its
  own dtype (moe.router_logit_scale multiplies the logits, which Hugging Face types lack)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "router" and isinstance(value, dict) and "kernel" in value:
      kernel = np.asarray(value["kernel"])
      value = {**value, "kernel": (kernel * np.asarray(scale, np.float32)).astype(kernel.dtype)}
    out[key] = _fold_router_scale(value, scale)
  return out


def _read_config_json(path: str) -> dict:
  """A run's config.json as a dict; unreadable or not an object: a one-line ConfigError."""
  try:
    spec = rundir.load_json(path, "config")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not isinstance(spec, dict):
    raise ConfigError(f"config {path} is not a JSON object")
  return spec


def _bias_shapes(mc: ModelConfig):
  """The `moe_bias` collection's tree of ShapeDtypeStructs ({} without one)."""
  model = Transformer(mc)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 1), np.int32)))
  return nn.unbox(shapes.get("moe_bias", {}))


def _load_moe_bias(workdir: str) -> dict:
  """The checkpoint's `moe_bias` collection as numpy arrays ({} when it has none)."""
  directory, step = ckpt_lib.resolve(workdir)
  saved = {k[len("moe_bias/"):]: v for k, v in ckpt_lib.saved_state_shapes(directory, step).items()
           if k.startswith("moe_bias/")}
  if not saved:
    return {}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = trees.unflatten({k: jax.ShapeDtypeStruct(s, np.float32, sharding=device)
                              for k, s in saved.items()}, sep="/")
  loaded = ckpt_lib.load_state_items(workdir, {"moe_bias": abstract}, where=f"--from={workdir}")
  return jax.tree.map(np.asarray, loaded["moe_bias"])


def _with_bias(block: dict, bias) -> dict:
  """Block params, with the block's `moe_bias` subtree under "moe_bias" when it has one."""
  return block if not bias else {**block, "moe_bias": bias}


def _index(tree, i):
  return {k: (_index(v, i) if isinstance(v, dict) else np.asarray(v)[i]) for k, v in tree.items()}


# ----------------------------------------------------------------------------- CLI


def _parse(argv: list[str]):
  """(flag values, config or None) from `argv` (argv[0] is the program), through `moe.cli`."""
  p = cli.prepare_argv(argv, run_flag="from")
  fv = flags.FlagValues()
  flags.DEFINE_string("from_hf", None, "local Hugging Face model folder to import", flag_values=fv)
  flags.DEFINE_string("to", None, "workdir to write the imported checkpoint into", flag_values=fv)
  flags.DEFINE_string("from", None, "our workdir to export (newest checkpoint)", flag_values=fv)
  flags.DEFINE_string("to_hf", None, "folder to write the exported Hugging Face model into",
                      flag_values=fv)
  flags.DEFINE_string("dtype", None, "export: cast the weights to bfloat16 | float32 (default: "
                      "as stored in the checkpoint)", flag_values=fv)
  config = cli.define_config_flag(fv, sys_argv=p.argv)
  if p.config is None:  # no config: import needs none, export reads the run's config.json
    rest = fv(p.argv)
    return fv, rest, None
  return fv, cli.parse(p, fv, config, run_flag="from"), config.value


def main(argv=None) -> int:
  """The command line (`argv`: sys.argv's form, the program first); returns the exit code."""
  argv = list(sys.argv if argv is None else argv)
  try:
    try:
      a, rest, cfg = _parse(argv)
    except flags.Error as e:
      raise ConfigError(str(e)) from None
    if len(rest) > 1:
      raise ConfigError(f"unexpected arguments {rest[1:]} (flags look like --name=value)")
    src = a["from"].value
    if a.dtype is not None and not a.to_hf:
      raise ConfigError("--dtype is an export flag (with --from=WORKDIR --to_hf=DIR)")
    if a.from_hf and a.to and not (src or a.to_hf):
      spec = from_hf(a.from_hf, a.to)
      print(f"converted {spec['source']['model_type']} from {a.from_hf} into {a.to} "
            f"(config: {rundir.join(a.to, CONFIG_PY)})")
    elif src and a.to_hf and not (a.from_hf or a.to):
      report = []
      config = to_hf(src, a.to_hf, cfg, dtype=a.dtype, report=report)
      print(f"exported {src} as {config['model_type']} ({config['dtype']}) into {a.to_hf}, "
            f"with {report[0]}")
    else:
      raise ConfigError("give either --from_hf=DIR --to=WORKDIR or --from=WORKDIR --to_hf=DIR")
  except ConfigError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
