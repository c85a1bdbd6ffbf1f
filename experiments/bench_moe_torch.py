"""The PyTorch rows of the MoE layer microbenchmark, one process per row: the Hugging Face Mixtral
sparse MoE block (with the experts implementation transformers picks for a model by default)
vs a PyTorch dense SwiGLU FFN of hidden width K*F, forward+backward, f32.

    python experiments/bench_moe_torch.py --T=8192 --E=64 --repeats=5

bench_moe_layer.py starts it once per E with no MALLOC_* variables, so PyTorch runs under its
own defaults: glibc's malloc untouched (this script imports neither JAX nor `moe.allocator`),
PyTorch's default CPU allocator, and torch.set_num_threads(os.cpu_count()). Prints one JSON line:
{"impl", "versions", "moe": [[wall s, CPU s], ...], "dense": [...]} (MoE and dense calls
alternate after one warm-up round); exit code 3 when torch / transformers are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench_common import race

D, F, K = 256, 1024, 2
EXIT_UNAVAILABLE = 3


def torch_steps(T, E):
  """(moe step, dense step, the experts implementation's name) at T tokens and E experts."""
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                         num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=16, router_jitter_noise=0.0)
  # The block of a one-layer model: building the model resolves the experts implementation a
  # user gets by default (transformers 5: "grouped_mm" where torch has it, CPU included); a
  # MixtralSparseMoeBlock built on its own falls back to the "eager" per-expert loop, whose
  # backward allocates a full [E, ...] gradient per expert (O(E^2) on CPU).
  model = MixtralForCausalLM(config)
  block = model.model.layers[0].mlp.train()
  for p in block.parameters():
    torch.nn.init.normal_(p, std=0.02)
  H = K * F
  dense = torch.nn.ModuleDict({"w_in": torch.nn.Linear(D, H, bias=False),
                               "w_gate": torch.nn.Linear(D, H, bias=False),
                               "w_out": torch.nn.Linear(H, D, bias=False)}).train()
  x = torch.randn(1, T, D)

  def moe_step():
    xi = x.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    block(xi).sum().backward()

  def dense_step():
    xi = x.clone().requires_grad_(True)
    dense.zero_grad(set_to_none=True)
    h = torch.nn.functional.silu(dense["w_gate"](xi)) * dense["w_in"](xi)
    dense["w_out"](h).sum().backward()

  impl = getattr(model.config, "_experts_implementation", None) or "eager"
  return moe_step, dense_step, impl


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--T", type=int, required=True, help="tokens")
  p.add_argument("--E", type=int, required=True, help="experts")
  p.add_argument("--repeats", type=int, default=5, help="timed MoE / dense pairs")
  args = p.parse_args(argv)
  try:
    import torch
    import transformers
    from transformers.models.mixtral import modeling_mixtral
    if not hasattr(modeling_mixtral, "MixtralSparseMoeBlock"):
      raise ImportError("transformers has no MixtralSparseMoeBlock")
  except Exception as e:  # noqa: BLE001 - any import problem means "not available"
    print(f"torch/transformers not usable: {e}".splitlines()[0], file=sys.stderr)
    return EXIT_UNAVAILABLE
  moe, dense, impl = torch_steps(args.T, args.E)
  times = race({"dense": dense, "moe": moe}, args.repeats)
  print(json.dumps({"impl": impl, "threads": torch.get_num_threads(),
                    "versions": f"torch {torch.__version__}, transformers "
                                f"{transformers.__version__}",
                    "moe": times["moe"], "dense": times["dense"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
