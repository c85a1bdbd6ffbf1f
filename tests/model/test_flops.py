"""moe.model.flops: the model-FLOPs count against a hand count and against the parameter count."""

from __future__ import annotations

import dataclasses

import pytest

from moe.layer.config import MoeConfig
from moe.model.config import ModelConfig
from moe.model.flops import flops_per_token, mean_context
from moe.model.transformer import active_params


def _hand_config(**kw) -> ModelConfig:
  base = dict(vocab_size=100, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
              d_ff=32, max_len=8, mlp_activation="gelu", moe_interval=2, first_moe_layer=1,
              moe=MoeConfig(num_experts=4, num_selected=2, expert_hidden=16,
                            num_shared_experts=1, expert_mlp="swiglu"))
  base.update(kw)
  return ModelConfig(**base)


def test_hand_count_gqa_interval_shared_experts():
  # 3 blocks, MoE only in block 1 (first_moe_layer=1, interval 2); GQA 4 query / 2 kv heads.
  # Multiply-adds per token, times 2 for FLOPs; L = 4 -> mean causal context (1+2+3+4)/4 = 2.5.
  c = flops_per_token(_hand_config(), seq_len=4)
  assert c.attention_proj == 3 * 2 * (16 * 4 * 8 + 2 * 16 * 2 * 8 + 4 * 8 * 16)  # q, k+v, o
  assert c.attention_scores == 3 * 2 * (4 * 8 * 2.5 + 4 * 8 * 2.5)  # QK^T and AV
  assert c.dense_ffn == 2 * 2 * (2 * 16 * 32)  # blocks 0 and 2, GELU: in and out
  assert c.router == 2 * 16 * 4
  assert c.experts == 2 * 3 * 16 * 16 * (2 + 1)  # SwiGLU, K=2 routed + 1 shared, not E=4
  assert c.unembedding == 2 * 16 * 100
  assert c.forward == 9216 + 960 + 4096 + 128 + 4608 + 3200
  assert c.train == 3 * c.forward


def test_only_active_experts_count():
  base = flops_per_token(_hand_config(), 4)
  more = flops_per_token(_hand_config(moe=dataclasses.replace(_hand_config().moe,
                                                               num_experts=64)), 4)
  assert more.experts == base.experts
  assert more.router == base.router * 16


def test_dense_model_and_tied_embeddings():
  dense = flops_per_token(_hand_config(moe=None), 4)
  assert dense.router == dense.experts == 0
  assert dense.dense_ffn == 3 * 2 * 2 * 16 * 32
  tied = flops_per_token(_hand_config(moe=None, tie_embeddings=True), 4)
  assert tied.unembedding == dense.unembedding  # the same matmul, whichever matrix it reads


@pytest.mark.parametrize("length, window, expected", [
    (4, None, 2.5), (1, None, 1.0), (6, 2, (1 + 2 + 2 + 2 + 2 + 2) / 6), (3, 10, 2.0)])
def test_mean_causal_context(length, window, expected):
  assert mean_context(length, window) == pytest.approx(expected)


@pytest.mark.parametrize("kw", [
    {}, {"moe": None}, {"num_kv_heads": 4, "mlp_activation": "swiglu"},
    {"moe_interval": 1, "first_moe_layer": 0}, {"tie_embeddings": True},
    {"moe": MoeConfig(num_experts=4, num_selected=2, expert_hidden=16, num_shared_experts=2,
                      shared_expert_hidden=12, shared_expert_gate=True)}])
def test_matmul_flops_are_twice_the_active_matmul_params(kw):
  """Without attention scores, forward FLOPs = 2 x the active parameters a token multiplies by:
  everything but the embedding lookup and the norm scales (RMSNorm, no biases, rotary)."""
  cfg = _hand_config(**kw)
  c = flops_per_token(cfg, seq_len=4)
  norms = (2 * cfg.num_layers + 1) * cfg.d_model
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # tied: counted as head
  assert c.forward - c.attention_scores == 2 * (active_params(cfg) - norms - lookup)


def test_needs_the_dataclass():
  with pytest.raises(TypeError):
    flops_per_token({"d_model": 16}, 4)
