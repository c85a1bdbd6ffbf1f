"""Helpers for the Hugging Face parity tests (test_convert.py, test_llama.py, test_olmoe.py,
test_qwen2_moe.py, test_deepseek.py): perturb a tiny random transformers model so that every norm, bias and routing decision matters, convert it,
compare logits, export it back and compare every tensor; export models initialised here.

Callers import torch and transformers with `pytest.importorskip` first."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import load_file

from moe.convert import cli as convert
from moe.model.config import model_config_from
from moe.model.transformer import Transformer
from moe.train import checkpoint as ckpt_lib
from moe import rundir

V = 61  # vocabulary of every tiny model here


def tokens(b=2, l=19, seed=0):
  return np.random.default_rng(seed).integers(0, V, (b, l)).astype(np.int32)


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def perturbed(model, seed=0):
  """`model` (eval mode) with norms and biases moved away from 1 / 0 and the other weights
  scaled up 5x from the 0.02 init (routing, norms and biases all matter)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if "norm" in n:
        p.add_(0.2 * noise)
      elif n.endswith(".bias"):
        p.copy_(0.3 * noise)
      else:
        p.mul_(5.0)
  return model.eval()


def hf_logits(model, toks):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(toks), dtype=torch.long)).logits.float().numpy()


def our_logits(workdir, toks):
  """Logits of the converted `workdir` (its `moe_bias` collection included when it has one)."""
  spec = json.load(open(os.path.join(workdir, "config.json")))
  mc = model_config_from(ml_collections.ConfigDict({"model": spec["model"], "moe": spec["moe"]}))
  variables = {"params": ckpt_lib.load_params(workdir)}
  bias = convert._load_moe_bias(workdir)
  if bias:
    variables["moe_bias"] = bias
  return apply_variables(mc, variables, toks)


def import_and_compare(model, tmp_path, toks=None) -> tuple[str, str, dict]:
  """Saves `model`, imports it; asserts logits rel < 1e-4. Returns (hf dir, workdir, spec)."""
  hf_dir, work = str(tmp_path / "hf"), str(tmp_path / "ours")
  model.save_pretrained(hf_dir)
  spec = convert.from_hf(hf_dir, work)
  toks = tokens() if toks is None else toks
  err = rel_err(our_logits(work, toks), hf_logits(model, toks))
  assert err < 1e-4, err
  return hf_dir, work, spec


def export_is_bit_equal(hf_dir, work, tmp_path) -> dict:
  """Exports `work` and asserts every tensor equals the original file's (same names, dtypes,
  bits). Returns the exported config.json."""
  out = str(tmp_path / "back")
  config = convert.to_hf(work, out)
  original = load_file(os.path.join(hf_dir, "model.safetensors"))
  again = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(original) == sorted(again)
  for name, x in original.items():
    assert again[name].dtype == x.dtype, name
    np.testing.assert_array_equal(again[name], x, err_msg=name)
  return config


def init_here(model_fields: dict, moe_fields: dict | None, workdir: str, seed=0):
  """A model with this project's parameter tree (Transformer.init's shapes, traced only: no
  compilation), drawn with numpy: kernels 0.3 * N(0, 1), norm scales 1 + 0.2 * N(0, 1), biases
  0.3 * N(0, 1); saved as `workdir` with its config.json like a training run's. Returns its
  ModelConfig."""
  spec = convert.model_groups(model_fields, moe_fields)
  mc = model_config_from(ml_collections.ConfigDict(spec))
  shapes = nn.unbox(jax.eval_shape(lambda: Transformer(mc).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(path[-1].key)
    x = rng.normal(size=s.shape)
    if name == "scale":
      x = 1.0 + 0.2 * x
    else:
      x = 0.3 * x
    return x.astype(s.dtype)
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  rundir.makedirs(workdir)
  convert.save_checkpoint(workdir, params)
  rundir.write_json_atomic(rundir.join(workdir, "config.json"), spec, default=None)
  return mc


def apply_variables(mc, variables, toks):
  """Our logits, jitted (op by op, an MoE model is slower than its compilation)."""
  return np.asarray(jax.jit(Transformer(mc).apply)(variables, jnp.asarray(toks)))


def apply_ours(mc, params, toks):
  return apply_variables(mc, {"params": params}, toks)


def export_matches_transformers(mc, workdir, tmp_path, toks=None) -> dict:
  """Exports `workdir`, loads it with AutoModelForCausalLM, asserts the same logits as ours
  (rel < 1e-4). Returns the exported config.json."""
  import torch
  import transformers
  out = str(tmp_path / "exported")
  config = convert.to_hf(workdir, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  toks = tokens(l=13, seed=3) if toks is None else toks
  ours = apply_ours(mc, ckpt_lib.load_params(workdir), toks)
  err = rel_err(hf_logits(back, toks), ours)
  assert err < 1e-4, err
  return config


def with_word_tokenizer(hf_dir: str, dest: str):
  """Copies `hf_dir` to `dest` with a word-level tokenizer.json over the V ids ("<pad>", "<s>",
  "</s>", w0, w1, ...). Callers `pytest.importorskip("tokenizers")` first. Returns it."""
  import shutil
  import tokenizers
  shutil.copytree(hf_dir, dest)
  words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(V - 3)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = None
  tok.save(os.path.join(dest, "tokenizer.json"))
  return tok


def greedy_matches_transformers(gen, model, tok, prompt: str, steps: int = 8):
  """Asserts our greedy completion of `prompt` (`moe.inference.generate`'s `gen`) is
  transformers' greedy `generate` up to where ours stops (EOS, which transformers was told not
  to stop at, or `steps` tokens). Returns our completion."""
  import torch
  ours = gen.complete(gen.encode_prompt(prompt), max_new_tokens=steps, temperature=0.0,
                      stop=["\x00never"])
  ids = torch.tensor([[1] + tok.encode(prompt).ids])
  with torch.no_grad():
    hf = model.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
  want = hf[0, ids.shape[1]:].tolist()
  n = len(ours.ids)
  assert ours.ids == want[:n]
  if ours.stopped == "eos":  # we stop at EOS (id 2)
    assert want[n] == 2
  else:
    assert ours.stopped == "length" and n == steps
  return ours
