"""Hugging Face conversion: tiny random GPT-2 and Mixtral models built with `transformers`, saved,
converted, and compared logit for logit in float32; Mixtral exported back and reloaded; errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt) to build "
                            "reference Hugging Face models")
transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(requirements-test.txt) to build reference models")

from conftest import REPO  # noqa: E402
from hf_parity import (V, greedy_matches_transformers, hf_logits, our_logits,  # noqa: E402
                       rel_err, tokens, with_word_tokenizer)
from moe import cli as cli_lib  # noqa: E402
from moe.convert import cli as convert  # noqa: E402
from moe.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=3, n_positions=32,
                                bos_token_id=1, eos_token_id=2, layer_norm_epsilon=1e-5)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # non-trivial biases and norms (the init leaves them 0 / 1)
    for n, p in model.named_parameters():
      if n.endswith("bias") or "ln_" in n:
        p.add_(0.1 * torch.randn_like(p))
  d = str(tmp_path_factory.mktemp("gpt2"))
  model.save_pretrained(d)
  return d, model


def mixtral_model(seed=0, **kw):
  torch.manual_seed(seed)
  base = dict(vocab_size=V, hidden_size=32, intermediate_size=20, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=5000.0, tie_word_embeddings=False)
  base.update(kw)
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**base)).eval()
  with torch.no_grad():  # larger weights than the 0.02 init: routing and norms matter
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
      else:
        p.mul_(5.0)
  return model


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
  model = mixtral_model()
  d = str(tmp_path_factory.mktemp("mixtral"))
  model.save_pretrained(d)
  return d, model


def test_gpt2_logits_match(gpt2_dir, tmp_path):
  hf_dir, model = gpt2_dir
  work = str(tmp_path / "gpt2")
  spec = convert.from_hf(hf_dir, work)
  assert spec["model"]["norm"] == "layer" and spec["moe"] == {"enabled": False}
  toks = tokens()
  ref = hf_logits(model, toks)
  got = our_logits(work, toks)
  assert got.shape == ref.shape
  assert rel_err(got, ref) < 1e-4
  # The same tensors through the launch-style config file.
  cfg = cli_lib.load_config_file(os.path.join(work, "config.py"))
  assert cfg.model.positions == "learned" and cfg.model.max_len == 32


def test_mixtral_logits_match_and_round_trip(mixtral_dir, tmp_path):
  hf_dir, model = mixtral_dir
  work = str(tmp_path / "mixtral")
  spec = convert.from_hf(hf_dir, work)
  assert spec["moe"]["capacity_factor"] is None and spec["moe"]["renormalize"] is True
  assert spec["model"]["rope_theta"] == 5000.0 and spec["model"]["num_kv_heads"] == 2
  toks = tokens(l=23, seed=1)
  ref = hf_logits(model, toks)
  got = our_logits(work, toks)
  assert rel_err(got, ref) < 1e-4
  # Back out to a HF folder: transformers loads it, same logits, same tensors.
  out = str(tmp_path / "hf_out")
  convert.to_hf(work, out)
  back = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert rel_err(hf_logits(back, toks), ref) < 1e-5
  original, again = model.state_dict(), back.state_dict()
  assert set(original) == set(again)
  for name in original:
    np.testing.assert_array_equal(original[name].numpy(), again[name].numpy(), err_msg=name)


def test_mixtral_tied_sliding_window(tmp_path):
  model = mixtral_model(seed=1, tie_word_embeddings=True, sliding_window=5)
  d = str(tmp_path / "hf")
  model.save_pretrained(d)
  work = str(tmp_path / "ours")
  spec = convert.from_hf(d, work)
  assert spec["model"]["tie_embeddings"] and spec["model"]["sliding_window"] == 5
  toks = tokens(l=17, seed=2)
  assert rel_err(our_logits(work, toks), hf_logits(model, toks)) < 1e-4


def test_bfloat16_safetensors_round_trip(tmp_path):
  import ml_dtypes
  from safetensors.numpy import load_file, save_file
  x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  path = str(tmp_path / "a.safetensors")
  save_file({"x": x, "y": np.ones(2, np.int64)}, path)
  got = convert.read_safetensors(path)
  np.testing.assert_array_equal(got["x"], x)
  # Our writer, bfloat16 included, is read back by the package and by our reader.
  b = x.astype(ml_dtypes.bfloat16)
  ours = str(tmp_path / "ours.safetensors")
  convert.write_safetensors(ours, {"b": x[:, :3], "a": np.arange(5, dtype=np.int32), "w": b},
                            {"k": 1})
  back = load_file(ours)
  np.testing.assert_array_equal(back["b"], x[:, :3])
  np.testing.assert_array_equal(back["a"], np.arange(5))
  w = convert.read_safetensors(ours)["w"]
  assert w.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(w.astype(np.float32), b.astype(np.float32))
  # The header says BF16, as Hugging Face files do.
  with open(ours, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    assert json.loads(f.read(n))["w"]["dtype"] == "BF16"
  # A file that is not safetensors: one line naming it.
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(ConfigError, match="bad.safetensors") as e:
    convert.read_safetensors(str(bad))
  assert "\n" not in str(e.value)


def test_unsupported_architecture_and_cli_errors(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24,
                                 num_hidden_layers=1, num_attention_heads=2)
  d = str(tmp_path / "llama")
  transformers.LlamaForCausalLM(cfg).save_pretrained(d)
  # A type no family module reads (the tensors are Llama's; the type is what is checked).
  with open(os.path.join(d, "config.json")) as f:
    hf = json.load(f)
  hf.update(model_type="persimmon", architectures=["PersimmonForCausalLM"])
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(hf, f)
  with pytest.raises(ConfigError, match=r"model_type='persimmon'.*PersimmonForCausalLM.*"
                                        r"supported: gpt2.*mixtral") as e:
    convert.from_hf(d, str(tmp_path / "x"))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="no config.json"):
    convert.from_hf(str(tmp_path), str(tmp_path / "y"))
  with pytest.raises(ConfigError, match="no checkpoint in"):
    convert.to_hf(str(tmp_path / "nothing"), str(tmp_path / "z"))
  r = subprocess.run([sys.executable, "-m", "moe.convert", f"--from_hf={d}",
                      f"--to={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
  assert "model_type='persimmon'" in r.stderr


def test_gpt2_export_refused(gpt2_dir, tmp_path):
  work = str(tmp_path / "g")
  convert.from_hf(gpt2_dir[0], work)
  with pytest.raises(ConfigError, match="model.norm='layer' has no Llama"):
    convert.to_hf(work, str(tmp_path / "out"))


def test_complete_with_converted_mixtral_matches_hf_greedy(mixtral_dir, tmp_path):
  """`--mode=complete` on a converted checkpoint: its tokenizer.json is used, and greedy
  decoding with our KV cache gives the tokens transformers' greedy `generate` gives."""
  pytest.importorskip("tokenizers")
  import io
  from moe.inference import generate
  hf_dir, model = mixtral_dir
  d = str(tmp_path / "hf")
  tok = with_word_tokenizer(hf_dir, d)
  work = str(tmp_path / "ours")
  convert.from_hf(d, work)
  cfg = cli_lib.load_config_file(os.path.join(work, "config.py"))
  gen = generate.load(cfg, work)
  assert isinstance(gen.tokenizer, generate.HfTokenizer) and gen.tokenizer.bos_id == 1
  prompt = "w5 w17 w3 w40"
  greedy_matches_transformers(gen, model, tok, prompt)
  out = io.StringIO()
  generate.main(cfg, work, prompt=prompt, max_new_tokens=3, temperature=0.0, out=out)
  assert out.getvalue().startswith(prompt)


def test_converted_workdir_needs_no_config_flag(mixtral_dir, tmp_path):
  """A converted checkpoint's config.json has only the model groups; export and launch.py take
  the config.py the converter wrote beside it when no --config is given."""
  hf_dir, _ = mixtral_dir
  work, out = str(tmp_path / "ours"), str(tmp_path / "hf")
  convert.from_hf(hf_dir, work)
  p = cli_lib.prepare_argv(["launch.py", f"--workdir={work}", "--mode=complete"])
  assert p.config == os.path.join(work, "config.py") and p.saved_from is None
  assert convert.main(["convert", f"--from={work}", f"--to_hf={out}"]) == 0
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "mixtral"
