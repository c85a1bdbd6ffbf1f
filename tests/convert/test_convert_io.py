"""Conversion plumbing: tensor-by-tensor reading in the stored dtype (bfloat16 stays bfloat16,
float32 params on load), export in the checkpoint's dtype or `--dtype`, and the tokenizer files
an export writes (byte tokenizer as tokenizer.json, an imported one carried through,
generation_config.json) so `AutoTokenizer` and `generate` work on the exported folder."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt) to build "
                            "reference Hugging Face models")
transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(requirements-test.txt) to build reference models")
tokenizers = pytest.importorskip("tokenizers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import ml_dtypes  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from conftest import one_line_error  # noqa: E402
from moe import cli as cli_lib  # noqa: E402
from moe.convert import cli as convert  # noqa: E402
from moe.convert import tensors as tensors_lib  # noqa: E402
from moe.data.tokenizers import ByteTokenizer  # noqa: E402
from moe.inference import generate  # noqa: E402
from moe.model.config import model_config_from  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402
from moe.train import checkpoint as ckpt_lib  # noqa: E402

V = 61


def tiny_mixtral(seed=0, vocab=V):
  torch.manual_seed(seed)
  cfg = transformers.MixtralConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=20, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
      max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = transformers.MixtralForCausalLM(cfg).eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p)) if "norm" in n else p.mul_(5.0)
  return model


def header(path) -> dict:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("bf16"))
  tiny_mixtral(vocab=ByteTokenizer.vocab_size).to(torch.bfloat16).save_pretrained(d)
  return d


def test_tensors_read_lazily_and_refuse_other_dtypes(bf16_dir, tmp_path):
  files = tensors_lib.SafetensorsFiles([os.path.join(bf16_dir, "model.safetensors")])
  assert files.reads == 0 and len(files) > 10  # opening reads no tensor
  t = tensors_lib.Tensors(files, "here")
  x = t.get("model.norm.weight", (32,))
  assert files.reads == 1 and x.dtype == ml_dtypes.bfloat16
  with one_line_error("'w'", "int8", "here"):
    tensors_lib.Tensors({"w": np.zeros(3, np.int8)}, "here").get("w")


def test_bf16_import_stays_bf16_and_loads_as_float32(bf16_dir, tmp_path, monkeypatch):
  counts = {}
  real = tensors_lib.SafetensorsFiles.__getitem__

  def counting(self, name):
    counts[name] = counts.get(name, 0) + 1
    return real(self, name)

  monkeypatch.setattr(tensors_lib.SafetensorsFiles, "__getitem__", counting)
  work = str(tmp_path / "ours")
  convert.from_hf(bf16_dir, work)
  source = load_file(os.path.join(bf16_dir, "model.safetensors"))
  assert set(counts) == set(source) and set(counts.values()) == {1}  # each tensor read once
  saved = ckpt_lib.load_params(work)  # as stored
  assert {str(x.dtype) for x in jax.tree.leaves(saved)} == {"bfloat16"}
  # Bit-equal to the file (the layout only transposes / reshapes / stacks).
  np.testing.assert_array_equal(saved["final_norm"]["scale"].view(np.uint16),
                                source["model.norm.weight"].view(np.uint16))
  np.testing.assert_array_equal(saved["block_1"]["moe"]["experts"]["w_out"][3].view(np.uint16),
                                source["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
                                .T.view(np.uint16))
  # Restored for a model (training, evaluation, generation): float32, the same values.
  cfg = cli_lib.load_config_file(os.path.join(work, "config.py"))
  gen = generate.load(cfg, work)
  leaves = jax.tree.leaves(gen.variables["params"])
  assert {str(x.dtype) for x in leaves} == {"float32"}
  np.testing.assert_array_equal(np.asarray(gen.variables["params"]["final_norm"]["scale"]),
                                source["model.norm.weight"].astype(np.float32))

  # Export: bfloat16 as stored, bit-equal to the source; --dtype=float32 casts.
  out = str(tmp_path / "hf_bf16")
  config = convert.to_hf(work, out)
  assert config["dtype"] == "bfloat16"
  back = load_file(os.path.join(out, "model.safetensors"))
  assert set(back) == set(source)
  for name in source:
    assert back[name].dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(back[name].view(np.uint16), source[name].view(np.uint16))
  out32 = str(tmp_path / "hf_f32")
  assert convert.to_hf(work, out32, dtype="float32")["dtype"] == "float32"
  assert {h["dtype"] for k, h in header(os.path.join(out32, "model.safetensors")).items()
          if k != "__metadata__"} == {"F32"}
  np.testing.assert_array_equal(load_file(os.path.join(out32, "model.safetensors"))[
      "lm_head.weight"], source["lm_head.weight"].astype(np.float32))
  with one_line_error("--dtype='float8'", "bfloat16, float32"):
    convert.to_hf(work, str(tmp_path / "x"), dtype="float8")


def _byte_run(tmp_path) -> str:
  """A run trained here on the byte tokenizer (random params, config.json as a run writes it)."""
  model = dict(vocab_size=ByteTokenizer.vocab_size, d_model=16, num_layers=2, num_heads=2,
               num_kv_heads=2, head_dim=8, d_ff=32, max_len=64)
  moe = dict(num_experts=4, num_selected=2, expert_hidden=16, capacity_factor=None,
             eval_capacity_factor=None)
  spec = convert.model_groups(model, moe)
  mc = model_config_from(ml_collections.ConfigDict(spec))
  init = jax.jit(Transformer(mc).init)
  params = nn.unbox(init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(lambda x: np.asarray(x) * 8, jax.device_get(params))  # peaked logits
  work = str(tmp_path / "run")
  convert.save_checkpoint(work, params)
  spec["data"] = {"tokenizer": "byte"}
  with open(os.path.join(work, "config.json"), "w") as f:
    json.dump(spec, f)
  return work


def test_export_writes_the_byte_tokenizer_and_generation_config(tmp_path):
  work = _byte_run(tmp_path)
  out = str(tmp_path / "hf")
  report = []
  config = convert.to_hf(work, out, report=report)
  assert "byte tokenizer" in report[0] and config["dtype"] == "float32"
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
  assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = 'def f(x):\n\treturn "naïve ✓"  # 日本'
  ours = ByteTokenizer().encode(text)
  assert tok(text, add_special_tokens=False).input_ids == ours
  assert tok(text).input_ids == [1] + ours  # BOS first, as documents were in training
  assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
  # generate() with the folder's generation config: our greedy completion's tokens.
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  prompt = "def fib(n):"
  ids = tok(prompt, return_tensors="pt")
  with torch.no_grad():
    hf_out = hf.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids.input_ids.shape[1]:]
  cfg = ml_collections.ConfigDict(json.load(open(os.path.join(work, "config.json"))))
  model = Transformer(model_config_from(cfg))
  gen = generate.Generator(model, ckpt_lib.load_params(work), {}, ByteTokenizer())
  c = gen.complete(gen.encode_prompt(prompt), max_new_tokens=6, temperature=0.0)
  assert c.ids == hf_out.tolist()[:len(c.ids)] and len(c.ids) >= 1


def test_imported_tokenizer_is_carried_through(tmp_path):
  d = str(tmp_path / "hf")
  tiny_mixtral(seed=1).save_pretrained(d)
  words = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(V - 3)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  tok.save(os.path.join(d, "tokenizer.json"))
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 64}, f)
  work = str(tmp_path / "ours")
  convert.from_hf(d, work)
  cfg = cli_lib.load_config_file(os.path.join(work, "config.py"))
  assert cfg.data.tokenizer == "hf:" + os.path.join(work, "hf_tokenizer")
  out = str(tmp_path / "out")
  report = []
  config = convert.to_hf(work, out, report=report)
  assert "its tokenizer" in report[0]
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert open(os.path.join(out, name)).read() == open(os.path.join(d, name)).read(), name
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert auto("w5 w17", add_special_tokens=False).input_ids == [8, 20]


def test_converted_tokenizer_must_be_used_for_fine_tuning(tmp_path):
  """train.init_from of a converted model with its own tokenizer and data.tokenizer='byte':
  one line naming the value to set, before any data or compilation."""
  from moe.train import checks
  d = str(tmp_path / "hf")
  tiny_mixtral(seed=2).save_pretrained(d)
  tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(
      os.path.join(d, "tokenizer.json"))
  work = str(tmp_path / "ours")
  convert.from_hf(d, work)
  cfg = cli_lib.load_config_file(os.path.join(work, "config.py"))
  cfg.train.init_from = work
  checks.validate_environment(cfg, 1, 1)  # hf:<work>/hf_tokenizer: accepted
  cfg.data.tokenizer = "byte"
  with one_line_error("data.tokenizer='byte'", f"hf:{work}/hf_tokenizer"):
    checks.validate_environment(cfg, 1, 1)
