"""`moe.eval_capacity_factor` follows the training factor unless set (configs/default.py).

Read through launch.py's own flag parsing (`launch.parse_flags`: the config file, its
`--config.x=v` overrides and the `--config.x=None` ones it applies itself), in a subprocess
because absl parses flags once per process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_config_file

_PARSE = """
import json, sys
import launch
launch.parse_flags(["launch.py", "--config=configs/default.py", "--workdir=/tmp/unused_run",
                    *sys.argv[1:]])
from moe.model.config import model_config_from
cfg = launch._CONFIG.value
moe = model_config_from(cfg, vocab_size=259).moe
print(json.dumps([cfg.moe.capacity_factor, cfg.moe.eval_capacity_factor,
                  moe.capacity_factor, moe.eval_capacity_factor]))
"""


def parsed_factors(*flags: str) -> tuple:
  """(capacity_factor, eval_capacity_factor) after launch.py parsed `flags`, as the config and
  as the layer's MoeConfig."""
  proc = subprocess.run([sys.executable, "-c", _PARSE, *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg_cf, cfg_ecf, layer_cf, layer_ecf = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (cfg_cf, cfg_ecf) == (layer_cf, layer_ecf)
  return cfg_cf, cfg_ecf


@pytest.mark.parametrize("flags, expected", [
    ([], (1.25, 2.0)),  # the default run: evaluation at 2.0, as measured in README
    (["--config.moe.capacity_factor=None"], (None, None)),  # dropless training evaluates dropless
    (["--config.moe.capacity_factor=3.0"], (3.0, 3.0)),  # never drops more than training
    (["--config.moe.capacity_factor=0.5"], (0.5, 2.0)),
    # Set explicitly: kept, whatever the training factor and the order of the flags.
    (["--config.moe.capacity_factor=None", "--config.moe.eval_capacity_factor=2.0"], (None, 2.0)),
    (["--config.moe.eval_capacity_factor=1.5", "--config.moe.capacity_factor=None"], (None, 1.5)),
    (["--config.moe.eval_capacity_factor=None"], (1.25, None)),
])
def test_eval_factor_follows_training_unless_set(flags, expected):
  assert parsed_factors(*flags) == expected


def test_eval_factor_follows_in_a_copy_and_records_its_value():
  """Sweeps deep-copy the base config and then apply members' overrides; config.json records
  the resolved value."""
  base = load_config_file("default")
  member = copy.deepcopy(base)
  member.moe.capacity_factor = None
  assert member.moe.eval_capacity_factor is None
  assert base.moe.eval_capacity_factor == 2.0  # the copy's link is its own
  recorded = json.loads(json.dumps(member.to_dict()))
  assert recorded["moe"]["capacity_factor"] is None
  assert recorded["moe"]["eval_capacity_factor"] is None
