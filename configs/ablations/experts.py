"""Number of experts at fixed compute per token: dense vs top-1 with E = 2, 4, 8, 16.

Switch Transformer (Fedus, Zoph, Shazeer, JMLR 2022), Sec. 3.1 and Figure 4 (left): "when
keeping the FLOPS per token fixed, having more parameters (experts) speeds up training"; the
figure's test losses are plotted, not printed, and were not read, so the claims carry no effect
size. Fig. 4 (right): the FLOP-matched sparse variants are more sample efficient than the dense
model. The dense baseline's FFN width equals one expert's (both SwiGLU), so every member does
the same active FLOPs (the router aside).

Run:  python launch.py --config=configs/ablations/experts.py --workdir=runs/experts
CPU time, measured 2026-12-01 on the 2-core CPU with the routing table running alongside:
5 members x 3 seeds = 15 runs of 1000 steps in 9 min 53 s (592 s of training); results in
experiments/ablation_results/experts/.

Seeds from power (`python -m moe.sweep.power --workdir=runs/experts` on the 3-seed run above;
experiments/ablation_results/POWER.md): 3.29 one-core minutes a seed, so 60 minutes on 2 cores
(`--sweep_shard=0/2` and `1/2` side by side) afford 36 seeds, 180 runs; projected from the measured
paired sd, the detectable effect falls from 0.011 (trend, per member step) and 0.024 nats (e2 vs
dense) at 3 seeds to 0.002 and 0.004 at 36. The committed results are still the 3-seed run.
"""

from configs.ablations import _base

SEEDS = 36  # seeds 0 .. 35, from power (docstring)


def get_config():
  dense = {"moe.enabled": False}
  moes = [{"moe.num_experts": e} for e in (2, 4, 8, 16)]
  members = [dense] + moes
  return _base.make_config(
      __file__,
      seeds=SEEDS,
      title="Number of experts (top-1, equal FLOPs per token) vs a dense FFN",
      paper="Fedus et al., Switch Transformers (JMLR 2022), Figure 4 (left)",
      members=members,
      # Top-1 everywhere; the dense FFN is as wide as one expert.
      # Top-1 weights are the router probability itself (Switch): renormalizing one weight
      # would make it 1 and leave the router without a language-model gradient.
      common={"moe.num_selected": 1, "moe.renormalize": False},
      cpu={"model.d_ff": _base.CPU["moe.expert_hidden"]},
      accelerator={"model.d_ff": _base.ACCELERATOR["moe.expert_hidden"]},
      published=[
          {"claim": "more experts give lower loss at the same FLOPs per token (E = 16 > 8 > 4 > 2 "
                    "> dense, the dense FFN counting as one expert)",
           "source": "Switch Transformer Sec. 3.1, Fig. 4 (left)",
           "published": "Sec. 3.1: consistent improvement with more experts at fixed FLOPs "
                        "per token; Fig. 4 values plotted only, not read",
           "kind": "trend",
           "order": [members.index(m) for m in reversed(moes)] + [members.index(dense)]},
          {"claim": "the smallest MoE (E=2) beats the FLOP-matched dense model",
           "source": "Switch Transformer Sec. 3.1, Fig. 4 (right: sparse variants vs dense)",
           "published": "not read (direction only; E=2 itself is not among the published "
                        "variants read here)",
           "order": [members.index(moes[0]), members.index(dense)]},
      ],
      smoke_members=(0, 1),  # dense vs E=2: one claim survives
  )
