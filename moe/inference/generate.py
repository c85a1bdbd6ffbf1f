"""Autocomplete with a trained (or converted) checkpoint, optionally showing the routing.

    python launch.py --workdir=runs/default --mode=complete --prompt='def fib(n):' --show_routing

`main(cfg, workdir, *, prompt, show_routing, max_new_tokens, temperature, top_p, seed, stop)`
loads the newest checkpoint in `workdir` (params and the MoE balancing bias), the tokenizer of
`cfg.data` (or the Hugging Face tokenizer a conversion left in `workdir/hf_tokenizer/`), and
prints the prompt followed by its completion (`completion_text`: the completion is decoded
together with the prompt, so tokenizers whose pieces' text depends on what precedes them print
it right); `prompt=None` reads prompts from stdin, one per line, until
EOF. `main(flags.FLAGS)` (launch.py's call) reads all of that from the absl flags. `cfg` must
agree with `workdir/config.json` where there is one (`moe.runconfig.EVAL_MAY_CHANGE`); launch.py
uses that file when no --config is given.

Decoding: the prompt (BOS first) is prefilled in one call, then one token at a time under one
jit'd step, both with the model's KV cache (`moe.model.transformer.init_cache`, collection
`cache`) and `train=False`, so MoE layers route with `moe.eval_capacity_factor`. The cache holds
`model.max_len` tokens (no rolling buffer): prompt + completion are kept within it (a longer
prompt keeps its last tokens). Sampling: `temperature <= 0` is greedy (argmax); otherwise
softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
probability reaches `top_p` (nucleus sampling; the most likely token is always kept, so
top_p -> 0 is greedy). Token i is drawn with `fold_in(PRNGKey(seed), i)`: the same seed gives the
same completion. Generation stops at `max_new_tokens`, at EOS, or at the first stop string (the
text is cut before it).

Routing (`show_routing`): every MoE layer sows its routing (expert_index, combine_weights, slot;
`moe.layer.sown.ROUTING`) into `intermediates`; prefill and steps make that collection mutable,
and so collect it, only when the routing is shown. For each generated token the chosen
experts and weights of every MoE layer are printed, and `moe.inference.routing_view` writes
`workdir/routing_map.html`, `routing_map.png` and `routing_load.json` (prompt and completion
tokens coloured by their top-1 expert per layer, plus each expert's share of the assignments).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe.data.tokenizers import (HF_PREFIX, TOKENIZER_JSON, ByteTokenizer, HfTokenizer,
                                  hf_tokenizer_path)
from moe import runconfig
from moe.errors import INT32_MAX, SEED_MAX, ConfigError, check_int, check_number
from moe.inference import routing_view
from moe.layer import sown
from moe.model.config import model_config_from, validate_model_groups
from moe.model.transformer import Transformer, init_cache
from moe import rundir
from moe.rundir import HF_TOKENIZER_DIR
from moe.train import checkpoint as ckpt_lib

DEFAULTS = dict(max_new_tokens=128, temperature=0.7, top_p=0.95, seed=0)


# ----------------------------------------------------------------------------- tokenizers


def load_tokenizer(cfg, workdir: str):
  """`workdir/hf_tokenizer/` when a conversion left one there, else the data config's
  (`data.tokenizer`: byte, sentencepiece or hf:<path>)."""
  hf = rundir.join(workdir, HF_TOKENIZER_DIR)
  if rundir.exists(rundir.join(hf, TOKENIZER_JSON)):
    return HfTokenizer(hf)
  if cfg.data.tokenizer == "byte":
    return ByteTokenizer()
  if isinstance(cfg.data.tokenizer, str) and cfg.data.tokenizer.startswith(HF_PREFIX):
    return HfTokenizer(hf_tokenizer_path(cfg.data.tokenizer))
  # SentencePiece: trained once on the data and cached there. Imported here for import time:
  # the data pipeline brings in TensorFlow (TFDS), which a byte-level completion never needs.
  from moe.data import pipeline as data_lib
  data_lib.validate_data(cfg.data)
  return data_lib.make_data(cfg, workdir=workdir).tokenizer


def completion_text(tokenizer, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
  """The text `ids` add after `prompt_ids`: decode(prompt + completion) minus decode(prompt).

  Decoding the completion on its own is wrong for tokenizers whose pieces' text depends on
  their position (a Metaspace "▁w" decodes to " w" inside a text but to "w" at its start, so the
  completion would lose its leading space, and a byte-level piece may finish a character the
  prompt began). Where decode(prompt) is not a prefix of the whole, the text after their common
  prefix is returned."""
  head = tokenizer.decode(list(prompt_ids))
  whole = tokenizer.decode(list(prompt_ids) + list(ids))
  if whole.startswith(head):
    return whole[len(head):]
  return whole[len(os.path.commonprefix([head, whole])):]


# ----------------------------------------------------------------------------- sampling


def sample_token(logits_V, key, temperature, top_p):
  """One token id from float32 logits [V]; temperature <= 0 -> argmax. Traceable."""
  greedy = jnp.argmax(logits_V).astype(jnp.int32)
  t = jnp.maximum(temperature, 1e-6)
  probs = jax.nn.softmax(logits_V.astype(jnp.float32) / t)
  order = jnp.argsort(-probs, stable=True)
  sorted_p = probs[order]
  before = jnp.cumsum(sorted_p) - sorted_p  # mass of strictly more likely tokens
  keep_sorted = (before < top_p) | (jnp.arange(sorted_p.shape[0]) == 0)
  keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
  masked = jnp.where(keep, jnp.log(jnp.maximum(probs, 1e-30)), -jnp.inf)
  sampled = jax.random.categorical(key, masked).astype(jnp.int32)
  return jnp.where(temperature <= 0, greedy, sampled)


# ----------------------------------------------------------------------------- routing capture


def routing_per_layer(intermediates, num_tokens: int) -> list[tuple[str, dict]]:
  """[(layer name, {expert_index, combine_weights, slot: [num_tokens, K] numpy})] in block order,
  from the routing every MoE layer sows (`moe.layer.sown.per_layer`; scanned stacks split into
  layers). The group axis is flattened and the group padding cut off (the first num_tokens rows
  are the B*L tokens, batch-major)."""
  layers = sown.per_layer(jax.device_get(intermediates), sown.ROUTING)
  return [(name, {k: np.asarray(v).reshape(-1, np.shape(v)[-1])[:num_tokens]
                  for k, v in d.items()}) for name, d in layers.items()]


# ----------------------------------------------------------------------------- session


@dataclasses.dataclass
class Completion:
  prompt_ids: list  # tokens fed to the model (BOS first)
  ids: list  # generated tokens (after the cut at a stop string: the text's tokens may differ)
  text: str  # decoded completion, cut at the first stop string
  logits: np.ndarray  # [len(ids_generated), V] the logits each generated token was drawn from
  stopped: str  # "length" | "eos" | "stop" | "cache"
  routing: list | None  # [(layer, {expert_index, combine_weights, slot: [P + n, K]})]; the
  # routing of prompt and generated tokens (the last one too, unless the cache was full)


class Generator:
  """A loaded model with compiled prefill / step functions (one per routing-capture flag)."""

  def __init__(self, model, params, moe_bias, tokenizer):
    self.model = model
    self.cfg = model.config
    self.variables = {"params": params, **({"moe_bias": moe_bias} if moe_bias else {})}
    self.tokenizer = tokenizer
    self._fns = {}

  def _compiled(self, capture: bool):
    if capture not in self._fns:
      model = self.model
      mutable = ["cache", "intermediates"] if capture else ["cache"]

      def apply(variables, cache, tokens_BL):
        return model.apply({**variables, "cache": cache}, tokens_BL, decode=True, train=False,
                           mutable=mutable)

      def prefill(variables, cache, tokens_1P, key, temperature, top_p):
        logits, mut = apply(variables, cache, tokens_1P)
        last = logits[0, -1]
        tok = sample_token(last, key, temperature, top_p)
        return tok, last, mut["cache"], mut.get("intermediates", {})

      def step(variables, cache, token, key, temperature, top_p):
        logits, mut = apply(variables, cache, token.reshape(1, 1))
        last = logits[0, -1]
        tok = sample_token(last, key, temperature, top_p)
        return tok, last, mut["cache"], mut.get("intermediates", {})

      self._fns[capture] = (jax.jit(prefill), jax.jit(step, donate_argnums=(1,)))
    return self._fns[capture]

  def encode_prompt(self, prompt: str) -> list[int]:
    ids = list(self.tokenizer.encode(prompt))
    bos = getattr(self.tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + ids

  def complete(self, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
               capture_routing: bool = False) -> Completion:
    S = self.cfg.max_len
    prompt_ids, budget = _fit_prompt(prompt_ids, max_new_tokens, S)
    prefill, step = self._compiled(capture_routing)
    base = jax.random.PRNGKey(int(seed))
    temperature = jnp.float32(temperature)
    top_p = jnp.float32(top_p)
    # Cache length: enough for prompt + completion, rounded up to a power of two (few distinct
    # shapes to compile) and at most model.max_len (a 32k-token model needs no 32k cache here).
    need = len(prompt_ids) + budget
    cache_size = min(S, max(64, 1 << (need - 1).bit_length()))
    cache = init_cache(self.model, 1, max_len=cache_size)
    tok, logits, cache, inter = prefill(self.variables, cache,
                                        jnp.asarray([prompt_ids], jnp.int32),
                                        jax.random.fold_in(base, 0), temperature, top_p)
    routing = [routing_per_layer(inter, len(prompt_ids))] if capture_routing else None
    ids, all_logits, stopped, text = [], [], "length", ""
    eos = getattr(self.tokenizer, "eos_id", None)
    for i in range(budget):
      t = int(tok)
      all_logits.append(np.asarray(logits))
      if eos is not None and t == eos:
        stopped = "eos"
        break
      ids.append(t)
      if stop:  # decoded per token only to look for a stop string
        text = completion_text(self.tokenizer, prompt_ids, ids)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
          text, stopped = text[:cut], "stop"
          break
      if i == budget - 1:
        stopped = "length" if budget == max_new_tokens else "cache"
        break
      tok, logits, cache, inter = step(self.variables, cache, jnp.int32(t),
                                       jax.random.fold_in(base, i + 1), temperature, top_p)
      if capture_routing:
        routing.append(routing_per_layer(inter, 1))
    if stopped != "stop":
      text = completion_text(self.tokenizer, prompt_ids, ids)
    if capture_routing and ids and stopped != "eos" and len(prompt_ids) + len(ids) <= cache_size:
      # Feed the last token once more, only to see how it is routed.
      _, _, cache, inter = step(self.variables, cache, jnp.int32(ids[-1]), base, temperature,
                                top_p)
      routing.append(routing_per_layer(inter, 1))
    merged = _merge_routing(routing) if capture_routing else None
    return Completion(prompt_ids=prompt_ids, ids=ids, text=text,
                      logits=np.stack(all_logits) if all_logits else np.zeros((0,)),
                      stopped=stopped, routing=merged)


def _fit_prompt(prompt_ids: Sequence[int], max_new_tokens: int, max_len: int):
  """(the prompt's last tokens that leave room for the completion, the tokens to generate);
  ConfigError for an empty prompt or max_new_tokens < 1. There is no rolling cache."""
  prompt_ids = list(prompt_ids)
  if not prompt_ids:
    raise ConfigError("the prompt is empty: give some text to continue")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  room = max(1, max_len - max_new_tokens)
  if len(prompt_ids) > room:
    prompt_ids = prompt_ids[-room:]
  return prompt_ids, min(max_new_tokens, max_len - len(prompt_ids))


def _merge_routing(routing):
  """Per-call [(layer name, {key: array})] lists -> one list, each array concatenated over the
  calls (prefill first, then one row per generated token)."""
  return [(name, {k: np.concatenate([r[j][1][k] for r in routing]) for k in routing[0][j][1]})
          for j, (name, _) in enumerate(routing[0])]


def load(cfg, workdir: str) -> Generator:
  """The newest checkpoint in `workdir` under `cfg`'s model: a ready Generator."""
  try:
    ckpt_lib.resolve(workdir)
  except ConfigError:
    raise ConfigError(f"no checkpoint in {workdir} (train one there first, or convert one with "
                      f"python -m moe.convert)") from None
  runconfig.check_saved(cfg, workdir, runconfig.EVAL_MAY_CHANGE)  # the run's own architecture
  validate_model_groups(cfg)  # before a SentencePiece tokenizer is built from the data
  tokenizer = load_tokenizer(cfg, workdir)
  model_cfg = model_config_from(cfg, vocab_size=tokenizer.vocab_size)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model in {workdir} "
                      f"only {model_cfg.vocab_size} (model.vocab_size): use the tokenizer it was "
                      f"trained with (a converted model needs its tokenizer.json in "
                      f"{rundir.join(workdir, HF_TOKENIZER_DIR)})")
  model = Transformer(model_cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  shapes = nn.meta.unbox({"params": shapes["params"], "moe_bias": shapes.get("moe_bias", {})})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          {k: v for k, v in shapes.items() if v})
  loaded = ckpt_lib.load_state_items(workdir, abstract, where=f"--workdir={workdir}")
  return Generator(model, loaded["params"], loaded.get("moe_bias", {}), tokenizer)


# ----------------------------------------------------------------------------- printing


def routing_line(token_text: str, layers: list, index: int) -> str:
  """`'x'  layer_0: e3 0.61, e1 0.39 | layer_1: ...` for token `index` of the captured routing."""
  parts = []
  for name, d in layers:
    chosen = []
    for k in range(d["expert_index"].shape[-1]):
      if "selected" in d and not d["selected"][index, k]:
        continue  # adaptive k: a slot this token did not take (neither chosen nor dropped)
      e, w, s = (int(d["expert_index"][index, k]), float(d["combine_weights"][index, k]),
                 int(d["slot"][index, k]))
      if s >= 0 and w > 0:
        chosen.append(f"e{e} {w:.2f}")
      elif s < 0 and d["expert_index"].shape[-1] < 64:
        chosen.append(f"e{e} dropped")
    parts.append(f"{name}: {', '.join(chosen) or '-'}")
  return f"{token_text!r:>8}  " + " | ".join(parts)


def _one(gen: Generator, workdir: str, prompt: str, *, show_routing: bool, max_new_tokens: int,
         temperature: float, top_p: float, seed: int, stop, out) -> Completion:
  c = gen.complete(gen.encode_prompt(prompt), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                   capture_routing=show_routing)
  print(prompt + c.text, file=out, flush=True)
  if show_routing and c.routing:
    P = len(c.prompt_ids)
    texts = [gen.tokenizer.decode([t]) for t in c.prompt_ids + c.ids]
    print(f"\nrouting of the {len(c.ids)} generated tokens (expert weight; eval capacity "
          f"factor {gen.cfg.moe.eval_capacity_factor}):", file=out)
    for i in range(min(len(c.ids), c.routing[0][1]["slot"].shape[0] - P)):
      print(routing_line(texts[P + i], c.routing, P + i), file=out)
    n = min(P + len(c.ids), c.routing[0][1]["slot"].shape[0])
    layers = [(name, {k: v[:n] for k, v in d.items()}) for name, d in c.routing]
    paths = routing_view.write_routing_map(workdir, texts[:n], layers,
                                           num_experts=gen.cfg.moe.num_experts, prompt_len=P)
    print("routing map: " + ", ".join(paths.values()), file=out, flush=True)
  elif show_routing:
    print("(no MoE layer in this model: nothing to show)", file=out)
  return c


def main(cfg, workdir: str | None = None, *, prompt: str | None = None, show_routing=False,
         max_new_tokens: int = DEFAULTS["max_new_tokens"],
         temperature: float = DEFAULTS["temperature"], top_p: float = DEFAULTS["top_p"],
         seed: int = DEFAULTS["seed"], stop: Sequence[str] | str = (), out=None, stdin=None):
  """Prints completions (see the module docstring). `main(flags.FLAGS)` reads the flags."""
  if workdir is None and hasattr(cfg, "__getitem__") and hasattr(cfg, "find_module_defining_flag"):
    return main(**_from_flags(cfg), out=out, stdin=stdin)
  out = out or sys.stdout
  if isinstance(stop, str):
    stop = [s for s in stop.split(",") if s] if stop else []
  stop = [_unescape(s) for s in stop]
  check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
  if prompt is not None and not prompt.strip():
    raise ConfigError("--prompt is empty: give some text to continue (or leave --prompt out for "
                      "an interactive prompt)")
  gen = load(cfg, workdir)
  kw = dict(show_routing=show_routing, max_new_tokens=int(max_new_tokens),
            temperature=float(temperature), top_p=float(top_p), seed=int(seed), stop=stop, out=out)
  if prompt is not None:
    return _one(gen, workdir, prompt, **kw).text
  stdin = stdin or sys.stdin
  texts = []
  interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
  while True:
    if interactive:
      print("prompt> ", end="", file=out, flush=True)
    line = stdin.readline()
    if not line:
      break
    line = _unescape(line.rstrip("\n"))
    if not line.strip():
      continue
    texts.append(_one(gen, workdir, line, **kw).text)
  return texts


def check_sampling(*, max_new_tokens, temperature, top_p, seed) -> None:
  """The generation flags, before any model work: ConfigError (one line) naming the flag."""
  check_int("--max_new_tokens", max_new_tokens, 1, high=INT32_MAX)
  check_number("--temperature", temperature, 0.0, math.inf)  # 0 = greedy
  check_number("--top_p", top_p, 0.0, 1.0, low_open=True)
  check_int("--seed", seed, 0, high=SEED_MAX)


def _unescape(s: str) -> str:
  """Command-line text: the two-character sequences \\n and \\t mean newline and tab."""
  return s.replace("\\n", "\n").replace("\\t", "\t")


def _from_flags(FLAGS) -> dict[str, Any]:
  """launch.py's flags -> main()'s arguments (optional flags fall back to DEFAULTS)."""
  def get(name, default=None):
    try:
      return FLAGS[name].value
    except KeyError:
      return default

  prompt = get("prompt")
  try:
    present = bool(FLAGS["prompt"].present)
  except KeyError:
    present = False
  if not present and not prompt:
    prompt = None  # no --prompt: interactive
  return dict(cfg=get("config"), workdir=get("workdir"), prompt=prompt,
              show_routing=bool(get("show_routing", False)),
              max_new_tokens=get("max_new_tokens", DEFAULTS["max_new_tokens"]),
              temperature=get("temperature", DEFAULTS["temperature"]),
              top_p=get("top_p", DEFAULTS["top_p"]), seed=get("seed", DEFAULTS["seed"]),
              stop=get("stop", ()) or ())
