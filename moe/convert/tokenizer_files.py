"""The tokenizer files of a conversion: kept on import, written on export (used by moe.convert.cli).

Import copies a Hugging Face folder's `tokenizer.json` (and its `tokenizer_config.json`,
`special_tokens_map.json`, `generation_config.json` when present) into `<workdir>/hf_tokenizer/`
with `special_tokens.json` ({"bos_id", "eos_id", "pad_id"} from config.json). The converted
`config.py` then sets `data.tokenizer="hf:<workdir>/hf_tokenizer"`, so fine-tuning and
`--mode=complete` use the model's own tokenizer (`moe.data.tokenizers.HfTokenizer`).

Export writes the run's tokenizer beside the model, so `transformers.AutoTokenizer` and
`model.generate` work on the folder:
- an imported model's tokenizer (`<workdir>/hf_tokenizer/`, or the `hf:` path of the run's
  `data.tokenizer`): its files, copied;
- the byte tokenizer: `tokenizer.json` built by `moe.data.tokenizers.byte_tokenizer_json` (the
  same ids as `ByteTokenizer`, BOS prepended as in training);
- SentencePiece: `tokenizer.json` built by `moe.data.tokenizers.sentencepiece_tokenizer_json`
  from the run's model (the one the data pipeline cached in the run's data dir,
  `moe.data.pipeline.make_tokenizer`; checked against summary.json's `data.tokenizer_key` when
  the run wrote one): the ids `SentencePieceTokenizer` gives, BOS prepended as in training;
- an import that came without a tokenizer.json: no tokenizer is written (the command's output
  says so);
plus a `tokenizer_config.json` when the source had none and a `generation_config.json`
(bos / eos / pad ids, the ones config.json gets too).
"""

from __future__ import annotations

import os

from moe import rundir
from moe.data import tokenizers
from moe.errors import ConfigError
from moe.rundir import CONFIG_FILE, HF_TOKENIZER_DIR, SUMMARY_FILE, write_json_atomic

CARRIED = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def import_tokenizer(folder: str, hf: dict, workdir: str) -> bool:
  """Copies the tokenizer of HF `folder` into `workdir/hf_tokenizer/`; False when it has none."""
  tok = os.path.join(folder, tokenizers.TOKENIZER_JSON)
  if not os.path.isfile(tok):
    return False
  dst = rundir.join(workdir, HF_TOKENIZER_DIR)
  rundir.makedirs(dst)
  rundir.copy_file(tok, rundir.join(dst, tokenizers.TOKENIZER_JSON))
  for name in CARRIED:
    if os.path.isfile(os.path.join(folder, name)):
      rundir.copy_file(os.path.join(folder, name), rundir.join(dst, name))
  eos = hf.get("eos_token_id")
  write_json_atomic(rundir.join(dst, tokenizers.SPECIAL_TOKENS_JSON),
                    {"bos_id": hf.get("bos_token_id"),
                     "eos_id": eos[0] if isinstance(eos, list) and eos else eos,
                     "pad_id": hf.get("pad_token_id")}, indent=None, default=None)
  return True


def run_tokenizer_folder(workdir: str, run_config: dict) -> str | None:
  """The folder of the Hugging Face tokenizer the run in `workdir` uses, or None (byte or
  SentencePiece): its own `hf_tokenizer/`, else the `hf:` path of its `data.tokenizer`."""
  own = rundir.join(workdir, HF_TOKENIZER_DIR)
  if rundir.exists(rundir.join(own, tokenizers.TOKENIZER_JSON)):
    return own
  spec = (run_config.get("data") or {}).get("tokenizer")
  if isinstance(spec, str) and spec.startswith(tokenizers.HF_PREFIX):
    path = tokenizers.hf_tokenizer_path(spec, field=f"{rundir.join(workdir, CONFIG_FILE)}: "
                                                    "data.tokenizer")
    return path.rsplit("/", 1)[0]
  return None


def export_tokenizer(workdir: str, run_config: dict, out_dir: str, config: dict) -> str:
  """Writes the run's tokenizer files into `out_dir` and sets config.json's bos / eos / pad ids
  (`config`, changed in place) to the tokenizer's; returns what was written, for the console."""
  spec = (run_config.get("data") or {}).get("tokenizer", "byte")
  folder = run_tokenizer_folder(workdir, run_config)
  if folder is not None:
    tok = tokenizers.HfTokenizer(folder)
    rundir.copy_file(rundir.join(folder, tokenizers.TOKENIZER_JSON),
                     rundir.join(out_dir, tokenizers.TOKENIZER_JSON))
    for name in CARRIED:
      if rundir.exists(rundir.join(folder, name)):
        rundir.copy_file(rundir.join(folder, name), rundir.join(out_dir, name))
    what = f"its tokenizer ({folder})"
  elif "source" in run_config:  # imported from a folder that had no tokenizer.json
    return "no tokenizer (the imported model came without a tokenizer.json)"
  elif spec == "byte":
    tok = tokenizers.ByteTokenizer()
    rundir.write_text_atomic(rundir.join(out_dir, tokenizers.TOKENIZER_JSON),
                             tokenizers.byte_tokenizer_json())
    what = "the byte tokenizer as tokenizer.json"
  elif spec == "sentencepiece":
    tok, key = _run_sentencepiece(workdir, run_config)
    rundir.write_text_atomic(rundir.join(out_dir, tokenizers.TOKENIZER_JSON),
                             tokenizers.sentencepiece_tokenizer_json(tok.model_proto))
    what = f"the SentencePiece tokenizer ({key}) as tokenizer.json"
  else:
    return f"no tokenizer (data.tokenizer={spec!r} has no tokenizer.json form)"
  config["bos_token_id"], config["eos_token_id"] = tok.bos_id, tok.eos_id
  config["pad_token_id"] = tok.pad_id
  if not rundir.exists(rundir.join(out_dir, TOKENIZER_CONFIG)):
    write_json_atomic(rundir.join(out_dir, TOKENIZER_CONFIG), _tokenizer_config(tok), indent=1,
                      default=None)
  if not rundir.exists(rundir.join(out_dir, GENERATION_CONFIG)):
    write_json_atomic(rundir.join(out_dir, GENERATION_CONFIG),
                      {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                       "pad_token_id": tok.pad_id}, indent=1, default=None)
  return what


def _run_sentencepiece(workdir: str, run_config: dict):
  """(SentencePieceTokenizer, key) of the run in `workdir`: its data group's model, which must be
  the one its summary.json names when there is one (a one-line ConfigError otherwise)."""
  import ml_collections
  from moe.data import pipeline
  d = ml_collections.ConfigDict(run_config["data"])
  try:
    pipeline.validate_data(d)
  except AttributeError as e:
    raise ConfigError(f"{rundir.join(workdir, CONFIG_FILE)}: its data group is incomplete ({e}); "
                      "pass --config=<the config file the run was trained with>") from None
  tok, key = pipeline.make_tokenizer(d, workdir=workdir)
  summary = rundir.join(workdir, SUMMARY_FILE)
  if rundir.exists(summary):
    try:
      trained = (rundir.load_json(summary, "summary").get("data") or {}).get("tokenizer_key")
    except (ValueError, AttributeError):
      trained = None
    if trained is not None and trained != key:
      raise ConfigError(f"data.tokenizer='sentencepiece': the model in the data dir is {key}, not "
                        f"the {trained} the run trained with ({summary}); set "
                        "data.tfds_data_dir to the data dir the run used")
  return tok, key


def _tokenizer_config(tok) -> dict:
  """A minimal tokenizer_config.json: the fast tokenizer class and the special tokens' text."""
  def text(i):
    if i is None:
      return None
    if isinstance(tok, tokenizers.ByteTokenizer):
      return tokenizers.BYTE_SPECIALS[i]
    return tok.id_to_token(i)

  return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(tok.bos_id),
          "eos_token": text(tok.eos_id), "pad_token": text(tok.pad_id),
          "clean_up_tokenization_spaces": False}
