"""DeepSeek-V3 / V2 conversion: tiny random models built with `transformers`, converted and
compared logit for logit in float32 (correction bias included), exported back bit-equal, greedy
generation through our latent KV cache, and a model initialised here exported as DeepSeek-V3."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt) to build "
                            "reference Hugging Face models")
transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(requirements-test.txt) to build reference models")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from conftest import one_line_error  # noqa: E402
import hf_parity  # noqa: E402
from hf_parity import V, hf_logits, our_logits, rel_err  # noqa: E402
from hf_parity import apply_variables as apply  # noqa: E402
from moe import cli as cli_lib  # noqa: E402
from moe.convert import cli as convert  # noqa: E402
from moe.convert import layouts  # noqa: E402
from moe.layer.config import MoeConfig  # noqa: E402
from moe.model.config import ModelConfig, model_config_from  # noqa: E402
from moe.train import checkpoint as ckpt_lib  # noqa: E402


def tokens(seed):
  return hf_parity.tokens(l=13, seed=seed)


def perturb(model, scale=4.0):
  """Weights larger than the 0.02 init, norms away from 1, a non-zero correction bias: routing,
  norms and the bias all change the logits."""
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.2 * torch.randn_like(p))
      else:
        p.mul_(scale)
    for n, b in model.named_buffers():
      if n.endswith("e_score_correction_bias"):
        b.copy_(0.3 * torch.randn_like(b))
  return model


SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=24, moe_intermediate_size=12,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12,
             qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=8,
             num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def v3_model(seed=0, **kw):
  torch.manual_seed(seed)
  base = dict(SMALL, q_lora_rank=10, n_shared_experts=1, n_group=4, topk_group=2,
              routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
              rope_interleave=True, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
  base.update(kw)
  return perturb(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**base)).eval())


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
  model = v3_model()
  d = str(tmp_path_factory.mktemp("deepseek_v3"))
  model.save_pretrained(d)
  return d, model


def assert_round_trip(work, out, model, cls, toks, ref):
  convert.to_hf(work, out)
  back = cls.from_pretrained(out, dtype=torch.float32).eval()
  assert rel_err(hf_logits(back, toks), ref) < 1e-5
  original, again = model.state_dict(), back.state_dict()
  assert set(original) == set(again)
  for name in original:
    np.testing.assert_array_equal(original[name].numpy(), again[name].numpy(), err_msg=name)


def test_deepseek_v3_logits_match_and_round_trip(v3_dir, tmp_path):
  hf_dir, model = v3_dir
  work = str(tmp_path / "v3")
  spec = convert.from_hf(hf_dir, work)
  m, moe = spec["model"], spec["moe"]
  assert m["attention"] == "mla" and m["first_moe_layer"] == 1 and m["rope_interleave"]
  assert moe["score_func"] == "sigmoid" and moe["bias_balancing"] and moe["num_groups"] == 4
  assert moe["routed_scale"] == 2.5 and moe["capacity_factor"] is None
  toks = tokens(seed=1)
  ref = hf_logits(model, toks)
  got = our_logits(work, toks)
  assert rel_err(got, ref) < 1e-4
  # The correction bias matters here: without it the logits move well past the tolerance.
  bias = convert._load_moe_bias(work)
  assert set(bias) == {"block_1"} and np.abs(bias["block_1"]["moe"]["bias"]).min() > 0
  zero = jax.tree.map(np.zeros_like, bias)
  mc = model_config_from(ml_collections.ConfigDict({"model": m, "moe": moe}))
  unbiased = apply(mc, {"params": ckpt_lib.load_params(work), "moe_bias": zero}, toks)
  assert rel_err(unbiased, ref) > 1e-2
  assert_round_trip(work, str(tmp_path / "out"), model, transformers.DeepseekV3ForCausalLM,
                    toks, ref)


@pytest.mark.parametrize("method", ["group_limited_greedy", "greedy"])
def test_deepseek_v2_logits_match_and_round_trip(method, tmp_path):
  torch.manual_seed(3)
  cfg = transformers.DeepseekV2Config(**dict(
      SMALL, q_lora_rank=None, n_shared_experts=2, topk_method=method, n_group=4, topk_group=2,
      routed_scaling_factor=1.5, first_k_dense_replace=0))
  model = perturb(transformers.DeepseekV2ForCausalLM(cfg).eval())
  d = str(tmp_path / "hf")
  model.save_pretrained(d)
  work = str(tmp_path / "v2")
  spec = convert.from_hf(d, work)
  assert spec["moe"]["score_func"] == "softmax" and not spec["moe"]["renormalize"]
  assert spec["moe"]["num_groups"] == (4 if method == "group_limited_greedy" else 1)
  assert spec["model"]["q_lora_rank"] is None and spec["model"]["rope_interleave"]
  toks = tokens(seed=2)
  ref = hf_logits(model, toks)
  assert rel_err(our_logits(work, toks), ref) < 1e-4
  assert_round_trip(work, str(tmp_path / "out"), model, transformers.DeepseekV2ForCausalLM,
                    toks, ref)


# YaRN as DeepSeek's checkpoints set it (V3: mscale = mscale_all_dim = 1.0 and factor 40;
# V2: 0.707 both), with a small original length so that the scaled frequencies matter at the
# positions compared, and mscale != mscale_all_dim so that the cos/sin factor is not 1.
YARN = {"rope_theta": 500.0, "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("version", [3, 2])
def test_yarn_with_mscale_logits_match_and_round_trip(version, tmp_path):
  """The scaled frequencies, the cos/sin factor and mscale_all_dim's softmax scale of MLA match
  transformers (without the mscales the logits move past the tolerance); the export loads with
  the same logits, tensors and rope_parameters."""
  if version == 3:
    model = v3_model(seed=4, rope_parameters=dict(YARN))
  else:
    torch.manual_seed(4)
    model = perturb(transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**dict(
        SMALL, q_lora_rank=None, n_shared_experts=1, first_k_dense_replace=1,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707)))).eval())
  d, work = str(tmp_path / "hf"), str(tmp_path / "ours")
  model.save_pretrained(d)
  spec = convert.from_hf(d, work)
  m = spec["model"]
  assert m["rope_type"] == "yarn" and m["rope_factor"] == 4.0 and m["rope_original_max_len"] == 8
  assert m["rope_mscale_all_dim"] == (1.0 if version == 3 else 0.707)
  toks = tokens(seed=5)
  ref = hf_logits(model, toks)
  assert rel_err(our_logits(work, toks), ref) < 1e-4
  mc = model_config_from(ml_collections.ConfigDict({"model": m, "moe": spec["moe"]}))
  bias = convert._load_moe_bias(work) if version == 3 else {}
  unscaled = apply(dataclasses.replace(mc, rope_mscale_all_dim=None, rope_mscale=None),
                   {"params": ckpt_lib.load_params(work), **({"moe_bias": bias} if bias else {})},
                   toks)
  assert rel_err(unscaled, ref) > 1e-3
  cls = transformers.DeepseekV3ForCausalLM if version == 3 else transformers.DeepseekV2ForCausalLM
  assert_round_trip(work, str(tmp_path / "out"), model, cls, toks, ref)
  back = transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).rope_parameters
  assert back == model.config.rope_parameters


def test_rope_scaling_and_fp8_refused(tmp_path):
  model = v3_model(seed=1, num_hidden_layers=1, first_k_dense_replace=0,
                   rope_parameters={"rope_theta": 500.0, "rope_type": "dynamic", "factor": 4.0})
  d = str(tmp_path / "hf")
  model.save_pretrained(d)
  with one_line_error("rope_type='dynamic'", "'yarn'"):
    convert.from_hf(d, str(tmp_path / "w"))
  # DeepSeek-V3's own fp8 checkpoints: refused in one line, not a list of unused scale tensors.
  model = v3_model(seed=1, num_hidden_layers=1, first_k_dense_replace=0)
  model.save_pretrained(d)
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  with one_line_error("quant_method='fp8'"):
    convert.from_hf(d, str(tmp_path / "w"))


def test_complete_with_converted_deepseek_v3_matches_hf_greedy(v3_dir, tmp_path):
  """Greedy decoding through our latent KV cache gives transformers' greedy `generate` tokens."""
  pytest.importorskip("tokenizers")
  from moe.inference import generate
  hf_dir, model = v3_dir
  d = str(tmp_path / "hf")
  tok = hf_parity.with_word_tokenizer(hf_dir, d)
  work = str(tmp_path / "ours")
  convert.from_hf(d, work)
  cfg = cli_lib.load_config_file(os.path.join(work, "config.py"))
  gen = generate.load(cfg, work)
  ours = hf_parity.greedy_matches_transformers(gen, model, tok, "w5 w17 w3 w40")
  assert len(ours.ids) >= 1


def trained_here(**moe_kw):
  model = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      d_ff=40, max_len=32, attention="mla", q_lora_rank=None, kv_lora_rank=10,
                      qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5, rope_interleave=False,
                      first_moe_layer=1, norm_eps=1e-5)
  moe = dict(num_experts=8, num_selected=2, expert_hidden=12, capacity_factor=None,
             eval_capacity_factor=None, score_func="sigmoid", bias_balancing=True,
             num_groups=4, groups_selected=2, group_score="top2_sum", routed_scale=2.0,
             num_shared_experts=2, shared_expert_hidden=6)
  moe.update(moe_kw)
  return dataclasses.replace(model, moe=MoeConfig(**moe))


@pytest.mark.parametrize("scan", [False, True])
def test_initialised_here_exports_as_deepseek_v3(scan, tmp_path):
  from tiny_models import init
  mc = trained_here()
  if scan:  # stacked params and bias (scanned blocks are all MoE)
    mc = dataclasses.replace(mc, scan_layers=True, first_moe_layer=0)
  toks = jnp.asarray(tokens(seed=4))
  v = init(mc, toks, seed=5)
  v["moe_bias"] = jax.tree.map(
      lambda x: jnp.asarray(np.random.default_rng(6).normal(size=x.shape) * 0.3, x.dtype),
      v["moe_bias"])
  ours = apply(mc, v, toks)
  work = str(tmp_path / "run")
  convert.save_checkpoint(work, v["params"], v["moe_bias"])
  groups = convert.model_groups(
      {k: getattr(mc, k) for k in ("vocab_size", "d_model", "num_layers", "num_heads",
                                   "num_kv_heads", "d_ff", "max_len", "attention", "q_lora_rank",
                                   "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                   "v_head_dim", "rope_interleave", "first_moe_layer",
                                   "norm_eps", "scan_layers")},
      {k: getattr(mc.moe, k) for k in mc.moe.__dataclass_fields__})
  with open(os.path.join(work, "config.json"), "w") as f:
    json.dump(groups, f)
  out = str(tmp_path / "hf")
  config = convert.to_hf(work, out)
  assert config["model_type"] == "deepseek_v3" and config["n_shared_experts"] == 1
  assert config["first_k_dense_replace"] == (0 if scan else 1)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(back).__name__ == "DeepseekV3ForCausalLM"
  assert rel_err(hf_logits(back, toks), ours) < 1e-4


@pytest.mark.parametrize("model_kw,moe_kw,needles", [
    (dict(attention="mha"), dict(), ("moe.score_func='sigmoid'", "model.attention='mla'")),
    (dict(), dict(score_func="softmax"), ("moe.bias_balancing=True", "score_func='sigmoid'")),
    (dict(), dict(num_groups=4, group_score="max"), ("moe.group_score='max'",)),
    (dict(sliding_window=4), dict(), ("model.sliding_window=4",)),
    (dict(), dict(enabled=False), ("model.attention='mla'", "dense")),
])
def test_what_deepseek_cannot_express(model_kw, moe_kw, needles):
  mc = trained_here(**{k: v for k, v in moe_kw.items() if k != "enabled"})
  model = {**{f: getattr(mc, f) for f in mc.__dataclass_fields__ if f != "moe"}, **model_kw}
  moe = {**{f: getattr(mc.moe, f) for f in mc.moe.__dataclass_fields__}, **moe_kw}
  with one_line_error(*needles):
    kind = layouts.export_type(model, moe)
    layouts.EXPORTERS[kind](model, moe, lambda i: {}, {})


@pytest.mark.slow  # a real training run (~20 s on 2 cores)
def test_finetune_from_a_deepseek_checkpoint_keeps_its_bias(tiny_config, tmp_path):
  """`train.init_from` a checkpoint with a correction bias (as a converted DeepSeek-V3 has):
  the real trainer runs MLA with sigmoid routing and starts from that bias, not from zeros."""
  from tiny_models import init
  from moe.train import trainer as train
  mc = trained_here(bias_rate=0.0)  # bias_rate 0: training keeps the bias as loaded
  v = init(dataclasses.replace(mc, vocab_size=259), jnp.asarray(tokens(seed=4)), seed=7)
  bias = jax.tree.map(lambda x: np.asarray(
      np.random.default_rng(8).normal(size=x.shape) * 0.3, np.float32), v["moe_bias"])
  parent = str(tmp_path / "parent")
  convert.save_checkpoint(parent, v["params"], bias)
  model_fields = ("attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "rope_interleave", "first_moe_layer",
                  "d_model", "num_heads", "num_kv_heads", "d_ff", "norm_eps")
  overrides = {f"model.{f}": getattr(mc, f) for f in model_fields}
  overrides.update({f"moe.{f}": getattr(mc.moe, f) for f in (
      "num_experts", "num_selected", "expert_hidden", "score_func", "bias_balancing",
      "bias_rate", "num_groups", "groups_selected", "group_score", "routed_scale",
      "num_shared_experts", "shared_expert_hidden")})
  cfg = tiny_config({**overrides, "model.vocab_size": 259, "train.init_from": parent,
                     "train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2})
  assert train.train_and_evaluate(cfg, str(tmp_path / "ft"))["status"] == "completed"
  after = convert._load_moe_bias(str(tmp_path / "ft"))
  assert set(after) == set(bias) == {"block_1"}
  np.testing.assert_array_equal(after["block_1"]["moe"]["bias"], bias["block_1"]["moe"]["bias"])
