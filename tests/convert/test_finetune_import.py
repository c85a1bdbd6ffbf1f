"""Fine-tuning an imported bfloat16 model through the trainer: its own tokenizer tokenizes the
data (`data.tokenizer="hf:..."` from the converted config.py) and `train.init_from` restores the
bfloat16 checkpoint as float32 params with the same values."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt)")
transformers = pytest.importorskip("transformers", reason="needs transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402

from conftest import apply_overrides, tiny_overrides  # noqa: E402
from moe import cli as cli_lib  # noqa: E402
from moe.convert import cli as convert  # noqa: E402
from moe.train import checkpoint as ckpt_lib  # noqa: E402


def bpe_folder(folder: str, texts: list[str], vocab_size: int = 300) -> int:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|endoftext|>"}, f)
  return tok.get_vocab_size()


@pytest.mark.slow
def test_finetune_a_bf16_import_with_its_tokenizer(textdir, tfds_dir, tmp_path):
  texts = [open(os.path.join(root, f), encoding="utf-8").read()
           for root, _, files in os.walk(textdir) for f in files if f.endswith(".txt")]
  hf_dir = str(tmp_path / "hf")
  os.makedirs(hf_dir)
  vocab = bpe_folder(hf_dir, texts)
  torch.manual_seed(0)
  cfg = transformers.MixtralConfig(
      vocab_size=vocab, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_local_experts=4,
      num_experts_per_tok=2, max_position_embeddings=32, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=0)
  transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(hf_dir)
  work = str(tmp_path / "imported")
  convert.from_hf(hf_dir, work)

  from moe.train import trainer
  run = cli_lib.load_config_file(os.path.join(work, "config.py"))
  assert run.data.tokenizer == "hf:" + os.path.join(work, "hf_tokenizer")
  keep = {k: v for k, v in tiny_overrides(textdir, tfds_dir).items()
          if k.startswith(("train.", "data.")) and k != "data.tokenizer"}
  apply_overrides(run, {**keep, "train.steps": 1, "train.eval_every": 1, "train.log_every": 1,
                        "train.checkpoint_every": 1, "train.eval_batches": 1,
                        "train.learning_rate": 1e-12, "train.weight_decay": 0.0,
                        "train.init_from": work, "train.trainable": "router_frozen"})
  ft = str(tmp_path / "ft")
  summary = trainer.train_and_evaluate(run, ft)
  assert summary["status"] == "completed" and np.isfinite(summary["eval_cross_entropy"])
  # The model's own tokenizer made the rows: a uniform random model predicts ~ln(vocab) nats.
  assert abs(summary["eval_cross_entropy"] - np.log(vocab)) < 1.0
  saved = json.load(open(os.path.join(ft, "config.json")))
  assert saved["data"]["tokenizer"] == run.data.tokenizer
  # bfloat16 in the import, float32 in the fine-tuned run, the same values (lr ~ 0).
  before = ckpt_lib.load_params(work)
  after = ckpt_lib.load_params(ft)
  assert {str(x.dtype) for x in jax.tree.leaves(before)} == {"bfloat16"}
  assert {str(x.dtype) for x in jax.tree.leaves(after)} == {"float32"}
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_allclose(b, a.astype(np.float32), rtol=1e-6, atol=1e-9)
