"""Load balancing: none, auxiliary loss weight 1e-3 / 1e-2 / 1e-1, loss-free bias rate 1e-3 / 1e-2.

Switch Transformer (Fedus et al. 2022) Sec. 2.2 (auxiliary loss, weight 1e-2 chosen from a
1e-1 .. 1e-5 sweep); OLMoE (Muennighoff et al. 2024) Sec. 4.1 (without the load-balancing loss
routing collapses onto few experts and quality drops); Wang et al., "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts" (DeepSeek, 2024): a selection-only bias balances
better than the auxiliary loss and reaches lower perplexity.

Run:  python launch.py --config=configs/ablations/balancing.py --workdir=runs/balancing
CPU time, measured 2026-11-29 on the 2-core CPU with a second table running alongside:
6 members x 3 seeds = 18 runs of 1000 steps in 21 min 34 s.
"""

from configs.ablations import _base


def get_config():
  none = {"moe.load_balance_weight": 0.0}
  aux = [{"moe.load_balance_weight": w} for w in (1e-3, 1e-2, 1e-1)]
  bias = [{"moe.load_balance_weight": 0.0, "moe.bias_balancing": True, "moe.bias_rate": u}
          for u in (1e-3, 1e-2)]
  members = [none] + aux + bias
  i = members.index
  return _base.make_config(
      __file__,
      title="Load balancing: none vs auxiliary loss vs auxiliary-loss-free bias (E=8, top-2)",
      paper="Fedus et al., Switch Transformers (2022), Sec. 2.2; Muennighoff et al., OLMoE (2024), "
            "Sec. 4.1; Wang et al., Auxiliary-Loss-Free Load Balancing (DeepSeek, 2024)",
      members=members,
      published=[
          {"claim": "a larger auxiliary-loss weight balances the load more (lower max/mean load)",
           "source": "Switch Sec. 2.2", "metric": "moe/max_over_mean_load",
           "order": [i(aux[2]), i(aux[1]), i(aux[0]), i(none)]},
          {"claim": "the load-balancing loss improves quality over no balancing",
           "source": "OLMoE Sec. 4.1", "order": [i(aux[1]), i(none)]},
          {"claim": "loss-free bias balancing reaches lower loss than the auxiliary loss",
           "source": "Wang et al. 2024 (loss-free balancing)", "order": [i(bias[0]), i(aux[1])]},
          {"claim": "loss-free bias balancing balances better than the auxiliary loss",
           "source": "Wang et al. 2024 (MaxVio)", "metric": "moe/max_over_mean_load",
           "order": [i(bias[0]), i(aux[1])]},
      ],
      smoke_members=(2, 4),
  )
