"""`launch.py --mode=analyze`: what the experts of a trained or imported MoE model learned.

  python launch.py --workdir=runs/default --mode=analyze                  # validation split
  python launch.py --workdir=runs/default --mode=analyze --analyze_batches=2
  python launch.py --workdir=runs/mixtral --mode=analyze --text_file=notes.txt

`run(cfg, workdir, *, text_file=None, batches=8) -> result` routes a text through the newest
checkpoint of `workdir` (params and balancing bias, `moe.inference.generate.load`; `train=False`,
so MoE layers route with `moe.eval_capacity_factor`), captures every MoE layer's routing (the
`intermediates` each layer sows, as `--mode=complete --show_routing` does), and computes, per
layer (`moe.inference.analysis_stats` defines each number): load per expert, mean k and drop
fraction, mean k per kind of token (`moe.inference.token_kinds`: whitespace, keyword,
identifier, ...; exact for the byte tokenizer, approximate where decoding one token alone drops
its leading space, as SentencePiece does); vocabulary specialization (top tokens and a score per
expert); domain specialization (per expert, the share of its tokens from each source); co-activation (an E x E matrix); and
router saturation (how much of the final checkpoint's top-k sets each earlier checkpoint kept in
`workdir/checkpoints/` already chooses, on the same tokens). `moe.inference.analysis_report`
writes `workdir/analysis/`: `analysis.json`, `report.html` (one file, figures embedded) and the
PNG figures (`moe.rundir.ANALYSIS_*` names), and `summary_lines(result)` is what launch.py prints.

The text:

- default, the validation split of `cfg.data`: its documents are read again with their source
  paths (`moe.data.sources.TextSource.named_documents`), tokenized and packed into rows of
  `data.seq_len + 1` exactly as the data pipeline packs them, a parallel packing of document
  numbers telling which document each token comes from; `batches` batches of `train.batch_size`
  rows are taken in the order the training's evaluation takes them (a permutation seeded by
  `moe.data.pipeline.EVAL_SEED`, without repeating rows), so for the built-in data a token's
  domain is its file: `library` / `tests` and its top-level package (`analysis_stats.
  path_domains`; the 12 most frequent packages by name, the rest as "other"). A TFDS dataset
  has no paths: one domain, "text".
- `text_file`: that file as one document (its own single domain), every row of it.

Only real tokens count (padding rows and slots are left out). A dense model (`moe.enabled`
False) is refused in one line before anything is loaded or compiled.
"""

from __future__ import annotations

import os
import time

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from moe import rundir
from moe.data import packing
from moe.errors import ConfigError, check_int
from moe.inference import analysis_stats as stats
from moe.inference import generate
from moe.inference import token_kinds as kinds_lib
from moe.train import checkpoint as ckpt_lib

DEFAULT_BATCHES = 8
MAX_BATCHES = 10_000
DOMAIN_GROUPS = 12  # packages shown by name; the rest is "other"


def check(cfg, *, batches: int) -> None:
  """The one-line refusals that need nothing loaded: a dense model, a bad batch count."""
  if not cfg.moe.enabled:
    raise ConfigError("--mode=analyze needs an MoE model: moe.enabled is False (a dense model "
                      "has no routing to analyze)")
  check_int("--analyze_batches", batches, 1, high=MAX_BATCHES)


# ----------------------------------------------------------------------------- the text


def _documents(cfg, workdir: str, text_file: str | None) -> list[tuple[str | None, str]]:
  """[(source path or None, text)] of the validation split, or of `text_file`."""
  if text_file:
    try:
      text = rundir.read_text(text_file)
    except (OSError, ValueError) as e:
      raise ConfigError(f"--text_file={text_file}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
      raise ConfigError(f"--text_file={text_file}: the file holds no text to analyze")
    return [(os.path.basename(text_file), text)]
  from moe.data import pipeline  # TFDS and grain: only when the split is read
  from moe.data import sources
  d = cfg.data
  pipeline.validate_data(d)
  data_dir = pipeline.data_dir_for(d.tfds_data_dir, workdir)
  os.makedirs(data_dir, exist_ok=True)
  source = sources.load_source(d.name, text_dir=d.text_dir,
                               validation_fraction=float(d.validation_fraction),
                               data_dir=data_dir)
  docs = list(source.named_documents("validation"))
  if not docs:
    raise ConfigError(f"data.name={d.name!r}: the validation split is empty (give --text_file)")
  return docs


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
  from moe.data.tokenizers import document
  encode = getattr(tokenizer, "encode_many", None)
  ids = encode(texts) if encode else [tokenizer.encode_array(t) for t in texts]
  return [document(tokenizer, x) for x in ids]


def pack_rows(docs_ids: list[np.ndarray], row_len: int) -> tuple[np.ndarray, ...]:
  """(tokens, segments, doc, pos [R, row_len]) as `moe.data.packing` packs the documents; doc
  is 1 + the document's index (0: padding) and pos the token's index in its document, from
  packing the document numbers and positions alongside."""
  tokens, segments = packing.pack_documents(docs_ids, row_len)
  doc, _ = packing.pack_documents([np.full(len(x), i + 1, np.int32) for i, x in
                                   enumerate(docs_ids)], row_len)
  pos, _ = packing.pack_documents([np.arange(len(x), dtype=np.int32) for x in docs_ids], row_len)
  return tokens, segments, doc, pos


def text_rows(cfg, workdir: str, tokenizer, *, text_file: str | None, batches: int) -> dict:
  """The rows to route: inputs / positions / segment_ids [R, L] (R a multiple of the batch
  size, padded with empty rows), doc / pos [R, L] (document number, position in it), the
  documents' paths and token ids."""
  from moe.data.pipeline import EVAL_SEED  # pylint: disable=import-outside-toplevel
  docs = _documents(cfg, workdir, text_file)
  docs_ids = _encode(tokenizer, [t for _, t in docs])
  tokens, segments, doc, pos = pack_rows(docs_ids, cfg.data.seq_len + 1)
  if tokens.shape[0] == 0:
    raise ConfigError("the text holds no tokens to analyze")
  B = int(cfg.train.batch_size)
  if text_file:
    order = np.arange(tokens.shape[0])
  else:
    order = np.random.default_rng(EVAL_SEED).permutation(tokens.shape[0])[:batches * B]
  R = -(-len(order) // B) * B
  pick = lambda a: np.concatenate([a[order], np.zeros((R - len(order), a.shape[1]), a.dtype)])
  ex = packing.row_to_example(pick(tokens), pick(segments), tokenizer.bytes_per_id)
  return {"inputs": ex["inputs"], "positions": ex["positions"],
          "segment_ids": ex["segment_ids"], "doc": pick(doc)[:, :-1], "pos": pick(pos)[:, :-1],
          "paths": [p for p, _ in docs], "docs_ids": docs_ids, "batch_size": B}


# ----------------------------------------------------------------------------- routing


def _router(model):
  """A jit'd (variables, inputs, positions, segment_ids) -> intermediates (the sown routing)."""

  def apply(variables, inputs, positions, segment_ids):
    _, mut = model.apply(variables, inputs, positions=positions, segment_ids=segment_ids,
                         train=False, mutable=["intermediates"])
    return mut["intermediates"]

  return jax.jit(apply)


def route(fn, variables, rows: dict, expert_choice: bool) -> list[tuple[str, stats.LayerRouting]]:
  """[(layer, LayerRouting of the real tokens)] of every MoE layer over all rows."""
  B = rows["batch_size"]
  per_layer: dict = {}
  for lo in range(0, rows["inputs"].shape[0], B):
    args = [jnp.asarray(rows[k][lo:lo + B]) for k in ("inputs", "positions", "segment_ids")]
    inter = fn(variables, *args)
    for name, d in generate.routing_per_layer(inter, args[0].size):
      per_layer.setdefault(name, []).append(d)
  mask = rows["segment_ids"].reshape(-1) != 0
  out = []
  for name, ds in per_layer.items():
    merged = {k: np.concatenate([d[k] for d in ds]) for k in ds[0]}
    out.append((name, stats.layer_routing(merged, mask, expert_choice)))
  if not out:
    raise ConfigError("--mode=analyze: the model has no MoE layer (model.moe_interval?): no "
                      "routing to analyze")
  return out


def earlier_checkpoints(workdir: str, final_step: int) -> list[tuple[int, str]]:
  """[(step, directory)] of the complete checkpoints before `final_step`, oldest first."""
  directory, _ = ckpt_lib.resolve(workdir)
  folder = epath.Path(directory)
  steps = sorted(int(p.name) for p in folder.iterdir()
                 if p.name.isdigit() and (p / ckpt_lib.STATE).is_dir())
  return [(s, rundir.join(directory, str(s))) for s in steps if s < final_step]


# ----------------------------------------------------------------------------- run


def _domains(rows: dict, mask: np.ndarray) -> dict:
  """{"kind": (names, index [N]), "package": (names, index [N])} of the real tokens (the
  DOMAIN_GROUPS packages with the most tokens by name)."""
  per_doc = [stats.path_domains(p) for p in rows["paths"]]
  doc_N = rows["doc"].reshape(-1)[mask] - 1
  out = {}
  for j, key in enumerate(("kind", "package")):
    label_D = np.asarray([d[j] for d in per_doc], dtype=object)
    out[key] = stats.group_labels(list(label_D[doc_N]), keep=DOMAIN_GROUPS)
  return out


def token_kinds(rows: dict, tokenizer, mask: np.ndarray) -> np.ndarray:
  """[N] kind of every real token (`moe.inference.token_kinds`): each document that has tokens
  in the rows is lexed whole, so a row that starts inside a string or a comment still reads it
  as one."""
  doc_N = rows["doc"].reshape(-1)[mask] - 1
  pos_N = rows["pos"].reshape(-1)[mask]
  pieces: dict[int, str] = {}
  out = np.zeros(doc_N.shape, np.int8)
  for d in np.unique(doc_N):
    ids = [int(v) for v in rows["docs_ids"][d]]
    for v in set(ids) - pieces.keys():
      pieces[v] = tokenizer.decode([v])
    at = doc_N == d
    out[at] = kinds_lib.token_kinds([pieces[v] for v in ids])[pos_N[at]]
  return out


def run(cfg, workdir: str, *, text_file: str | None = None,
        batches: int = DEFAULT_BATCHES) -> dict:
  """The routing analysis (module docstring); writes `workdir/analysis/`, returns the result."""
  check(cfg, batches=batches)
  from moe.inference import analysis_report  # matplotlib: after the one-line checks
  start = time.perf_counter()
  gen = generate.load(cfg, workdir)
  _, final_step = ckpt_lib.resolve(workdir)
  E, expert_choice = int(cfg.moe.num_experts), cfg.moe.router == "expert_choice"
  rows = text_rows(cfg, workdir, gen.tokenizer, text_file=text_file, batches=batches)
  fn = _router(gen.model)
  final = route(fn, gen.variables, rows, expert_choice)
  mask = rows["segment_ids"].reshape(-1) != 0
  token_ids = rows["inputs"].reshape(-1)[mask]
  domains = _domains(rows, mask)
  kind_N = token_kinds(rows, gen.tokenizer, mask)
  V = max(int(gen.tokenizer.vocab_size), int(token_ids.max()) + 1)
  result = {"workdir": rundir.absolute(workdir), "step": final_step,
            "text": {"file": rundir.absolute(text_file)} if text_file else
                    {"split": "validation", "data": cfg.data.name},
            "tokens": int(mask.sum()), "rows": int((rows["segment_ids"] != 0).any(1).sum()),
            "num_experts": E, "num_selected": int(cfg.moe.num_selected),
            "k_rule": str(cfg.moe.get("k_rule", "fixed")),
            "eval_capacity_factor": cfg.moe.eval_capacity_factor,
            "load": {}, "token_kinds": {}, "vocabulary": {}, "domains": {}, "coactivation": {},
            "saturation": []}
  for name, r in final:
    result["load"][name] = stats.layer_load(r, E)
    result["token_kinds"][name] = stats.by_kind(r, kind_N, kinds_lib.KINDS)
    voc = stats.vocabulary(r, token_ids, E, V)
    for x in voc["experts"]:
      for t in x["top_tokens"] + x["distinctive_tokens"]:
        t["text"] = gen.tokenizer.decode([t["id"]])
    result["vocabulary"][name] = voc
    result["domains"][name] = {key: stats.domain_shares(r, index, names, E)
                               for key, (names, index) in domains.items()}
    result["coactivation"][name] = stats.coactivation(r, E)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          gen.variables)
  for step, path in earlier_checkpoints(workdir, final_step):
    loaded = ckpt_lib.load_state_items(path, abstract, where=f"--workdir={workdir}")
    earlier = dict(route(fn, loaded, rows, expert_choice))
    layers = {name: stats.saturation(r, earlier[name], E) for name, r in final}
    result["saturation"].append({"step": step, "layers": layers,
                                 "mean": float(np.mean(list(layers.values())))})
  result["seconds"] = round(time.perf_counter() - start, 2)
  if jax.process_index() == 0:
    result["files"] = analysis_report.write(rundir.join(workdir, rundir.ANALYSIS_DIR), result)
  return result


def summary_lines(result: dict) -> list[str]:
  """A short summary: per layer mean k, drop, top expert score and top pair; saturation."""
  from moe.inference import analysis_report
  return analysis_report.summary_lines(result)
