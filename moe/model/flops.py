"""Model FLOPs per token of the language model, counted from its `ModelConfig` (nothing traced).

`flops_per_token(cfg, seq_len)` -> `FlopCount`: the matmul FLOPs (2 per multiply-add) of one
token's forward pass, by part, and `train` = 3 x forward (the backward pass costs two forwards: the
gradients with respect to activations and to weights). The formula is in docs/semantics.md
("Model FLOPs"); in short, per token, with D = d_model, H / N query / key-value heads of width Dh,
F the dense FFN width, E experts of width F_e, K chosen per token, S shared experts, V the
vocabulary and m = 3 matrices for SwiGLU (2 for GELU):

  attention projections  2 * D * Dh * (2H + 2N)          every block
  attention scores       2 * 2 * H * Dh * ctx            QK^T and AV; ctx = mean keys per query
  dense FFN              2 * m * D * F                   dense blocks
  router                 2 * D * E                       MoE blocks
  experts                2 * m * D * F_e * (K + S)       MoE blocks: only the active experts
  unembedding            2 * D * V                       tied or not (the embedding lookup is free)

With `attention="mla"` (moe/model/mla.py; Rq, R the q / kv latent ranks, Dn, Dr, Dv the
no-rope, rope and value head widths) the attention lines are

  attention projections  2 * (D*Rq + Rq*H*(Dn+Dr)  [or D*H*(Dn+Dr) without Rq]
                              + D*(R+Dr) + R*H*(Dn+Dv) + H*Dv*D)
  attention scores       2 * H * (Dn + Dr + Dv) * ctx

(keys and values expanded from the latent once per token, as in training).

ctx is the causal average over the L = seq_len query positions of the keys each one sees,
mean_i min(i + 1, sliding_window), i.e. (L + 1) / 2 without a window. Norms, softmax, activations
and biases are not counted (elementwise, not matmuls); rematerialization adds hardware FLOPs, not
model FLOPs, so it changes nothing here. These are the FLOPs MFU is measured against.
"""

from __future__ import annotations

import dataclasses

from moe.layer.config import planned_k
from moe.model.config import ModelConfig

FORWARD_AND_BACKWARD = 3  # forward + backward = 3 forwards


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward-pass FLOPs of one token, by part (summed over blocks)."""

  attention_proj: float
  attention_scores: float
  dense_ffn: float
  router: float
  experts: float
  unembedding: float

  @property
  def forward(self) -> float:
    return sum(dataclasses.astuple(self))

  @property
  def train(self) -> float:
    """Forward + backward FLOPs of one training token."""
    return FORWARD_AND_BACKWARD * self.forward


def mlp_matrices(activation: str) -> int:
  """Weight matrices of one FFN: SwiGLU has gate, in and out; GELU in and out."""
  return 3 if activation == "swiglu" else 2


def mean_context(seq_len: int, sliding_window: int | None = None) -> float:
  """Mean number of keys a query attends to under the causal mask (and the window, if any)."""
  w = seq_len if sliding_window is None else min(sliding_window, seq_len)
  # positions 0..w-1 see i + 1 keys, the remaining L - w positions see w keys
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def mla_projections(cfg: ModelConfig) -> int:
  """Multiply-adds of one token through MLA's projections (see the module docstring)."""
  D, H, R = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
  Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  q = D * H * (Dn + Dr) if cfg.q_lora_rank is None else cfg.q_lora_rank * (D + H * (Dn + Dr))
  return q + D * (R + Dr) + R * H * (Dn + Dv) + H * Dv * D


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCount:
  """The forward FLOPs of one token of a `seq_len`-token sequence (see the module docstring)."""
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"flops_per_token needs a moe.model.config.ModelConfig, got {type(cfg)}")
  D, Dh, H, N = cfg.d_model, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  ctx = mean_context(seq_len, cfg.sliding_window)
  moe_blocks = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  dense_blocks = cfg.num_layers - moe_blocks
  router = experts = 0.0
  if cfg.moe is not None and moe_blocks:
    m = cfg.moe
    shared_hidden = m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden)
    active_hidden = planned_k(m) * m.expert_hidden + shared_hidden  # adaptive k: its target
    router = moe_blocks * 2.0 * D * (m.num_experts + int(m.shared_expert_gate))
    experts = moe_blocks * 2.0 * mlp_matrices(m.expert_mlp) * D * active_hidden
  proj, scores = D * Dh * (2 * H + 2 * N), 2 * H * Dh * ctx
  if cfg.attention == "mla":
    proj, scores = mla_projections(cfg), H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
                                              + cfg.v_head_dim) * ctx
  return FlopCount(
      attention_proj=cfg.num_layers * 2.0 * proj,
      attention_scores=cfg.num_layers * 2.0 * scores,
      dense_ffn=dense_blocks * 2.0 * mlp_matrices(cfg.mlp_activation) * D * cfg.d_ff,
      router=router, experts=experts, unembedding=2.0 * D * cfg.vocab_size)
