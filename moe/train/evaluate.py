"""`launch.py --mode=eval`: evaluate one checkpoint of a run, write the result, print one line.

  python launch.py --workdir=runs/e4 --mode=eval                       # newest, validation
  python launch.py --workdir=runs/e4 --mode=eval --step=300 --eval_split=train
  python launch.py --workdir=runs/e4 --mode=eval --eval_file=notes.txt
  python launch.py --workdir=runs/ft --mode=eval --checkpoint=runs/e4/checkpoints/300

`run(cfg, workdir, *, step, checkpoint, split, text_file) -> result dict`:

- the checkpoint: the newest in `workdir`, `workdir/checkpoints/<step>`, or `checkpoint` (a
  workdir, its checkpoints/ or a step directory) read under `cfg`'s model;
- the text: `split="validation"` (default) is the `train.eval_batches` validation batches the
  training evaluates (the same rows, so the numbers match summary.json's at the same step);
  `split="train"` as many batches of training rows (a fixed permutation); any other split of a
  TFDS dataset (`data.name` not built in, e.g. `--eval_split=test`) is read like the validation
  split (up to `moe.data.sources.MAX_SPLIT_CHARS["validation"]` characters, packed the same way,
  the same rows chosen: `train.eval_batches` batches, a permutation seeded by
  `moe.data.pipeline.EVAL_SEED`; raise `--config.train.eval_batches` to read more);
  `text_file` is one document (BOS + the file's tokens under the run's tokenizer + EOS) packed
  into rows of `data.seq_len + 1` like the data (`moe.data.packing`), every row evaluated,
  the last batch padded with empty rows (no loss there; their padding tokens are routed, so a
  layer's load and drop fraction include them);
- the metrics (`moe.train.step.eval_metrics`, MoE layers routing with
  `moe.eval_capacity_factor`): `eval_cross_entropy` (nats/token), `eval_bits_per_byte`,
  `eval_perplexity` (exp of the cross-entropy), `eval_loss`, `eval_moe/dropped_fraction`, and
  `layers`: each MoE layer's `load` (share of the assignments per expert) and drop fraction;
- the result goes to `workdir/eval_<what>_step<N>.json` (`moe.rundir.eval_result_file`; what =
  validation | train | file-<name>), process 0 only; `summary_line(result)` is what launch.py
  prints.

The config is checked against `workdir/config.json` first (`moe.runconfig.EVAL_MAY_CHANGE`: e.g.
another `moe.eval_capacity_factor` is fine, another `moe.num_experts` is not).
"""

from __future__ import annotations

import math
import os
import re

from etils import epath
import jax
import numpy as np

from moe import rundir
from moe import runconfig
from moe import sharding as sharding_lib
from moe.data import packing
from moe.data import sources
from moe.data import tokenizers
from moe.data.pipeline import EVAL_SEED, PackedRows, encode_documents
from moe.errors import ConfigError
from moe.rundir import CHECKPOINTS_DIR, eval_result_file, write_json_atomic
from moe.train import checkpoint as ckpt_lib
from moe.train import step as step_lib
from moe.train import loop
from moe.train import trainer

SPLITS = ("validation", "train")
LAYER_KEYS = ("load", "dropped_fraction", "tokens_dropped_fraction")


def evaluate_batches(s: trainer.Setup, params, moe_bias, batches) -> dict:
  """Metrics of `batches` (global, sharded): eval_metrics + perplexity + per-layer means."""
  step = jax.jit(step_lib.make_eval_step(s.model, layer_keys=LAYER_KEYS))
  sums: dict = {}
  with sharding_lib.activate(s.mesh):
    for b in batches:
      for k, v in jax.device_get(step(params, moe_bias, b)).items():
        sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
  if not sums:
    raise ConfigError("nothing to evaluate: no batches (train.eval_batches=0?)")
  n = max(float(sums["batches"]), 1.0)
  out = step_lib.eval_metrics({k: float(v) for k, v in sums.items() if np.ndim(v) == 0})
  out["eval_perplexity"] = math.exp(min(out["eval_cross_entropy"], 700.0))
  out["eval_bytes"] = float(sums["bytes"])
  layers: dict = {}
  for key, v in sums.items():
    if key.startswith("layer/"):
      name, field = key[len("layer/"):].rsplit("/", 1)
      layers.setdefault(name, {})[field] = (np.asarray(v) / n).tolist()
  out["layers"] = layers
  return out


# ----------------------------------------------------------------------------- the text


def _batches_of_rows(rows, indices: np.ndarray, global_batch: int) -> list[dict]:
  """This process's part of each global batch of `rows[indices]` (indices [N, global_batch];
  -1 = an empty row)."""
  local = global_batch // jax.process_count()
  lo = jax.process_index() * local
  out = []
  for g in range(indices.shape[0]):
    examples = [rows(int(i)) for i in indices[g, lo:lo + local]]
    out.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return out


def split_batches(s: trainer.Setup, split: str) -> list[dict]:
  """The validation batches the training evaluates, as many of training rows, or of another
  split of the TFDS dataset."""
  if split == "validation":
    return s.data.eval_batches()
  t = s.cfg.train
  if split not in SPLITS:
    return other_split_batches(s, split)
  rows = PackedRows(s.data.info["packed_dir"], split, s.data.tokenizer.bytes_per_id)
  perm = np.random.default_rng(0).permutation(len(rows))
  n = t.eval_batches * t.batch_size
  return _batches_of_rows(lambda i: rows[i], perm[np.arange(n) % len(rows)].reshape(
      t.eval_batches, t.batch_size), t.batch_size)


def other_split_batches(s: trainer.Setup, split: str) -> list[dict]:
  """A split the run did not pack (e.g. lm1b's "test"), packed here as the pipeline packs the
  validation split, and the rows chosen as it chooses them (`_eval_batches`' rule)."""
  d, t, tok = s.cfg.data, s.cfg.train, s.data.tokenizer
  texts = sources.split_documents(d.name, split, s.data.info["data_dir"])
  tokens, segments = packing.pack_documents(encode_documents(tok, texts), d.seq_len + 1)
  if tokens.shape[0] == 0:
    raise ConfigError(f"--eval_split={split!r}: the split holds no text to evaluate")
  perm = np.random.default_rng(EVAL_SEED).permutation(tokens.shape[0])
  order = perm[np.arange(t.eval_batches * t.batch_size) % tokens.shape[0]]
  return _batches_of_rows(
      lambda i: packing.row_to_example(tokens[i], segments[i], tok.bytes_per_id),
      order.reshape(t.eval_batches, t.batch_size), t.batch_size)


def file_batches(s: trainer.Setup, path: str) -> list[dict]:
  """The text file as one document under the run's tokenizer, packed into rows of
  `data.seq_len + 1`, in batches of `train.batch_size` (the last padded with empty rows)."""
  try:
    text = rundir.read_text(path)
  except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8
    raise ConfigError(f"--eval_file={path}: {getattr(e, 'strerror', None) or e}") from None
  tok = s.data.tokenizer
  doc = tokenizers.document(tok, tok.encode_array(text))
  tokens, segments = packing.pack_documents([doc.astype(np.int64)], s.cfg.data.seq_len + 1)
  if tokens.shape[0] == 0 or not text.strip():
    raise ConfigError(f"--eval_file={path}: the file holds no text to evaluate")
  B = s.cfg.train.batch_size
  N = -(-tokens.shape[0] // B) * B
  indices = np.full(N, -1)
  indices[:tokens.shape[0]] = np.arange(tokens.shape[0])
  empty = np.zeros_like(tokens[0])

  def row(i):
    if i < 0:
      return packing.row_to_example(empty, empty, tok.bytes_per_id)
    return packing.row_to_example(tokens[i], segments[i], tok.bytes_per_id)

  return _batches_of_rows(row, indices.reshape(-1, B), B)


# ----------------------------------------------------------------------------- run


def _checkpoint_path(workdir: str, step: int | None, checkpoint: str | None) -> str:
  if step is not None and checkpoint:
    raise ConfigError("give --step or --checkpoint, not both")
  if checkpoint:
    return checkpoint
  if step is None:
    return workdir
  directory = rundir.join(workdir, CHECKPOINTS_DIR)
  path = rundir.join(directory, str(step))
  try:
    ckpt_lib.resolve(path)
  except ConfigError:
    have = sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()) \
        if rundir.isdir(directory) else []
    raise ConfigError(f"--step={step}: no such checkpoint in {directory} (steps: {have})") \
        from None
  return path


def _what(cfg, split: str | None, text_file: str | None) -> str:
  if split and text_file:
    raise ConfigError("give --eval_split or --eval_file, not both")
  if text_file:
    stem = os.path.splitext(os.path.basename(text_file))[0]
    return "file-" + re.sub(r"[^\w.-]", "_", stem)
  split = split or "validation"
  if split not in SPLITS and cfg.data.name in sources.BUILTIN:
    raise ConfigError(f"--eval_split must be one of {list(SPLITS)} for data.name="
                      f"{cfg.data.name!r} (other splits exist for TFDS datasets), got {split!r}")
  if not re.fullmatch(r"[\w.-]+", split):
    raise ConfigError(f"--eval_split={split!r}: give a split name such as 'test' (no slices)")
  return split


def run(cfg, workdir: str, *, step: int | None = None, checkpoint: str | None = None,
        split: str | None = None, text_file: str | None = None) -> dict:
  """Evaluates one checkpoint (see the module docstring); returns the result written."""
  what = _what(cfg, split, text_file)
  runconfig.check_saved(cfg, workdir, runconfig.EVAL_MAY_CHANGE)
  path = _checkpoint_path(workdir, step, checkpoint)
  directory, ckpt_step = ckpt_lib.resolve(path)
  s = trainer.setup(cfg, workdir)
  batches = file_batches(s, text_file) if text_file else split_batches(s, what)
  abstract = {k: v for k, v in s.abstract.items() if v}  # moe_bias is {} in a dense model
  where = f"--checkpoint={checkpoint}" if checkpoint else f"--workdir={workdir}"
  loaded = ckpt_lib.load_state_items(path, abstract, where=where)
  metrics = evaluate_batches(s, loaded["params"], loaded.get("moe_bias", {}),
                             [loop.global_batch(b, s.batch_sharding) for b in batches])
  result = {"checkpoint": rundir.join(directory, str(ckpt_step)), "step": ckpt_step,
            "text": {"file": rundir.absolute(text_file)} if text_file else {"split": what},
            "eval_capacity_factor": cfg.moe.eval_capacity_factor if cfg.moe.enabled else None,
            "batches": len(batches), **metrics}
  result["file"] = rundir.join(workdir, eval_result_file(what, ckpt_step))
  if jax.process_index() == 0:
    write_json_atomic(result["file"], result, indent=2)
  return result


def summary_line(r: dict) -> str:
  """One line: what was evaluated and the headline numbers."""
  drop = r.get("eval_moe/dropped_fraction")
  text = r["text"].get("split") or r["text"].get("file")
  return (f"eval of step {r['step']} on {text}: cross-entropy {r['eval_cross_entropy']:.4f} "
          f"nats/token, {r['eval_bits_per_byte']:.4f} bits/byte, perplexity "
          f"{r['eval_perplexity']:.2f}"
          + (f", dropped {drop:.2%}" if drop is not None else "")
          + f" ({r['file']})")
