r"""A tiny random Hugging Face MoE model with its own tokenizer, built locally (no hub).

  python experiments/make_tiny_hf.py --type=mixtral --out=runs/tiny_hf

Writes what `save_pretrained` writes (config.json + model.safetensors, bfloat16 by default) and
a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json, EOS `<|endoftext|>`, no BOS,
as Qwen's) trained on a sample of the Python standard library, the built-in data. The README's
fine-tuning walk-through starts from this folder; on a machine that reaches the hub the same
commands take a real checkpoint's folder instead.

  python experiments/make_tiny_hf.py --compare --ours=runs/ft --hf=runs/ft_hf

compares the logits of our newest checkpoint in `--ours` (dropless) with those of the exported
folder `--hf` loaded by `transformers.AutoModelForCausalLM`, on a text tokenized by the folder's
`AutoTokenizer`, then lets `generate` continue the text's first line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
TYPES = ("mixtral", "qwen3_moe", "olmoe")


def train_tokenizer(folder: str, vocab_size: int, max_chars: int = 3_000_000) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))

  def texts():
    budget = max_chars
    for path in files:
      if budget <= 0:
        return
      with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
      budget -= len(text)
      yield text

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
               "pad_token": EOS, "clean_up_tokenization_spaces": False}, f, indent=1)


def build(kind: str, vocab: int):
  import torch
  import transformers
  torch.manual_seed(0)
  common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=0)
  if kind == "mixtral":
    cfg = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4,
                                     num_experts_per_tok=2, **common)
    return transformers.MixtralForCausalLM(cfg)
  if kind == "qwen3_moe":
    cfg = transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=96,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                      decoder_sparse_step=1, mlp_only_layers=[], **common)
    return transformers.Qwen3MoeForCausalLM(cfg)
  cfg = transformers.OlmoeConfig(intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                 **common)
  return transformers.OlmoeForCausalLM(cfg)


def make(kind: str, out: str, vocab: int, dtype: str) -> None:
  import torch
  os.makedirs(out, exist_ok=True)
  train_tokenizer(out, vocab)
  model = build(kind, vocab).eval()
  model.to(getattr(torch, dtype)).save_pretrained(out)
  n = sum(p.numel() for p in model.parameters())
  print(f"wrote a random {kind} ({n / 1e6:.2f}M params, {dtype}) with a {vocab}-piece BPE "
        f"tokenizer into {out}")


def compare(ours: str, hf: str, text: str) -> None:
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  import torch
  import transformers
  sys.path.insert(0, REPO)
  from moe.model.config import model_config_from
  from moe.model.transformer import Transformer
  from moe.train import checkpoint as ckpt_lib
  with open(os.path.join(ours, "config.json")) as f:
    spec = json.load(f)
  spec["moe"]["eval_capacity_factor"] = None  # dropless, as Hugging Face MoE models route
  mc = model_config_from(ml_collections.ConfigDict({"model": spec["model"], "moe": spec["moe"]}))
  params = ckpt_lib.load_params(ours)
  tok = transformers.AutoTokenizer.from_pretrained(hf)
  ids = tok(text, return_tensors="np").input_ids.astype(np.int32)
  got = np.asarray(Transformer(mc).apply({"params": params}, jnp.asarray(ids)), np.float32)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
  with torch.no_grad():
    want = model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
  rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  same = float(np.mean(got.argmax(-1) == want.argmax(-1)))
  print(f"{type(model).__name__} from {hf}: {ids.shape[1]} tokens, logits max rel err "
        f"{rel:.2e}, same argmax at {same:.0%} of positions")
  prompt = tok(text.splitlines()[0], return_tensors="pt")
  with torch.no_grad():  # the folder's generation_config.json gives eos / pad
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
  print(f"transformers generate (greedy): {tok.decode(out[0], skip_special_tokens=True)!r}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--type", default="mixtral", choices=TYPES)
  p.add_argument("--out", default="runs/tiny_hf")
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--compare", action="store_true")
  p.add_argument("--ours")
  p.add_argument("--hf")
  p.add_argument("--text", default="def fib(n):\n    if n < 2:\n        return n\n")
  a = p.parse_args()
  if a.compare:
    compare(a.ours, a.hf, a.text)
  else:
    make(a.type, a.out, a.vocab, a.dtype)


if __name__ == "__main__":
  main()
