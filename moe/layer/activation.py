"""The FFN activation, one definition for the routed and shared experts and the model's dense MLP.

    a = activate(h_in, h_gate, "swiglu")   # silu(h_gate) * h_in
    a = activate(h_in, None, "gelu")       # gelu(h_in), tanh approximation (GPT-2's)
    d_in, d_gate = activate_bwd(h_in, h_gate, d_a, name)   # its VJP (d_gate None for gelu)

h_in = x @ w_in and h_gate = x @ w_gate are the pre-activations. Upcycling's exactness rests on
this being one function: an expert copied from a dense FFN computes what that FFN computed.
"""

from __future__ import annotations

import jax


def activate(h_in, h_gate, activation: str):
  """silu(h_gate) * h_in (swiglu), or the tanh-approximate GELU of h_in (gelu; h_gate unused)."""
  if activation == "swiglu":
    return jax.nn.silu(h_gate) * h_in
  return jax.nn.gelu(h_in, approximate=True)


def activate_bwd(h_in, h_gate, d_act, activation: str):
  """(d h_in, d h_gate) from d act, for backward passes written by hand (d h_gate None for gelu)."""
  if activation == "swiglu":
    s = jax.nn.sigmoid(h_gate)
    silu = h_gate * s
    return d_act * silu, d_act * h_in * (s * (1 + h_gate * (1 - s)))
  _, vjp = jax.vjp(lambda h: jax.nn.gelu(h, approximate=True), h_in)
  return vjp(d_act)[0], None
