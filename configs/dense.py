"""The dense baseline of configs/default.py: the same Transformer with every MoE block replaced by
a dense FFN of width K*F, so a token uses the same feed-forward parameters (and FLOPs) as in the
MoE model (the MoE model has E/K times more FFN parameters in total, plus the routers).

Run:   python launch.py --config=configs/dense.py --workdir=runs/dense
Reach: everything else equal (data, 500 steps, batch, schedule, seed 0), measured once on the
       2-core CPU: validation 2.113 bits per byte (cross-entropy 1.464 nats per token) against
       the MoE default's 2.069 (1.434); one seed, so the gap is indicative only. README.md has the
       times.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.moe.enabled = False  # every block is dense
  c.model.d_ff = c.moe.num_selected * c.moe.expert_hidden  # K*F: the MoE model's active FFN width
  return c
