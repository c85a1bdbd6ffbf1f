"""Every field of configs/default.py, given each kind of bad value it can take, is refused with a
one-line ConfigError naming it, by the trainer's own checks, before anything is compiled.

The table below has one row per field; `test_every_field_has_a_row` walks the default config, so a
new field without a row fails it. Each field gets the bad values of its type (`BY_TYPE`: wrong
types, and nan/inf for numbers) plus its row's own (negative, zero, out of range, unknown
choice, too large). Values the typed ConfigDict itself refuses (a string into an int field) are set
here under `ignore_type()`, so the validation is shown to refuse them too (a config built in code
or by a sweep is not parsed); `launch.py`'s parsing of such flags is checked by the subprocess
cases at the end, with the fields the issue named and the generation flags. (A string put into
moe.capacity_factor this way leaves the config unreadable, since moe.eval_capacity_factor is
computed from it; such a value is shown to be refused by the typed ConfigDict instead.)
"""

from __future__ import annotations

import math

import pytest

from conftest import apply_overrides, load_config_file, one_line_error
from test_config import CompileCounter, assert_one_line_error, run_launch
from moe.data.tokenizers import ByteTokenizer
from moe.errors import INT32_MAX, SEED_MAX
from moe.model.config import check_vocab_size
from moe.train.checks import validate_config

NAN, INF = math.nan, math.inf
BIG = INT32_MAX + 1  # past the int32 step counter and token ids


class Says:
  """A bad value whose error names other text than the field (e.g. the axis that fills the mesh)."""

  def __init__(self, value, *needles):
    self.value, self.needles = value, needles


# Bad values of each type, for every field of that type (None too where the field is not optional).
# (A bool given to a float field is cast to 1.0 by the ConfigDict itself, even under
# ignore_type(), so it never reaches the checks; tests/test_errors.py shows they refuse it.)
BY_TYPE = {
    int: ["8", 2.5, True, NAN, INF],
    float: ["0.1", "inf", NAN, INF, -INF],
    bool: [1, 0, "True", 1.0],
    str: [5, 1.5, True],
}
# Fields where None is a setting (placeholders, or "from the tokenizer").
OPTIONAL = {"model.vocab_size", "model.sliding_window", "model.logits_soft_cap", "model.qk_norm",
            "model.q_lora_rank", "model.rope_original_max_len", "model.rope_attention_factor",
            "model.rope_mscale", "model.rope_mscale_all_dim",
            "moe.capacity_factor", "moe.eval_capacity_factor", "moe.group_size",
            "moe.shared_expert_hidden", "moe.target_k"}
FILL = "mesh.data=-1 cannot fill"  # a mesh axis too large for the 1 device the table assumes

ROWS = {
    "model.vocab_size": [-2, 10, BIG],  # 10 < the byte tokenizer's 259 ids
    "model.d_model": [0, -1, BIG],
    "model.num_layers": [0, -1, BIG],
    "model.num_heads": [0, -1, BIG, 3],  # 3: not a multiple of num_kv_heads=4
    "model.num_kv_heads": [0, -1, BIG, 3],
    "model.head_dim": [0, -1, BIG, 31],  # odd with rotary positions
    "model.d_ff": [0, -1, BIG],
    "model.max_len": [0, -1, BIG, 128],  # 128 < data.seq_len=256
    "model.moe_interval": [0, -1, BIG],
    "model.first_moe_layer": [-1, 4, 5, BIG],  # 4 layers: no MoE block at all
    "model.dtype": ["float16", "fp32"],
    "model.scan_layers": [],
    "model.remat": [],
    "model.norm": ["batch"],
    "model.norm_eps": [0.0, -1.0],
    "model.positions": ["alibi"],
    "model.rope_theta": [0.0, -1.0],
    "model.rope_type": ["linear", "dynamic", "YaRN"],
    "model.rope_factor": [0.5, 0.0, -1.0],  # below 1: no extension
    "model.rope_original_max_len": [0, -1, BIG],
    "model.rope_low_freq_factor": [0.0, -1.0, 4.0],  # 4.0: not below rope_high_freq_factor
    "model.rope_high_freq_factor": [0.0, -1.0, 1.0],  # 1.0: not above rope_low_freq_factor
    "model.rope_beta_fast": [0.0, -1.0, 0.5],  # 0.5 < rope_beta_slow
    "model.rope_beta_slow": [0.0, -1.0, 33.0],  # 33 > rope_beta_fast
    "model.rope_truncate": [],
    "model.rope_attention_factor": [0.0, -1.0],
    "model.rope_mscale": [0.0, -1.0],
    "model.rope_mscale_all_dim": [0.0, -1.0],
    "model.mlp_activation": ["relu"],
    "model.attention_bias": [],
    "model.qkv_bias": [],
    "model.qk_norm": ["rms", "Head"],
    "model.tie_embeddings": [],
    "model.sliding_window": [0, -1, BIG],
    "model.logits_soft_cap": [0.0, -1.0],
    "model.attention": ["mqa", "MLA"],
    "model.q_lora_rank": [0, -1, BIG],
    "model.kv_lora_rank": [0, -1, BIG],
    "model.qk_nope_head_dim": [0, -1, BIG],
    "model.qk_rope_head_dim": [0, -1, BIG, 15],  # odd
    "model.v_head_dim": [0, -1, BIG],
    "model.rope_interleave": [],
    "moe.enabled": [],
    "moe.num_experts": [0, -1, BIG, 1],  # 1 < K=2
    "moe.num_selected": [0, -1, 9],  # 9 > E=8
    "moe.expert_hidden": [0, -1, BIG],
    "moe.capacity_factor": [0.0, -1.0],
    "moe.eval_capacity_factor": [0.0, -1.0],
    "moe.min_capacity": [-1, BIG],
    "moe.group_size": [0, -1, BIG],
    "moe.router": ["top_k", "expert_choice"],  # expert choice reads the future: not allowed
    "moe.priority": ["random", "bpr"],  # likewise
    "moe.allow_noncausal_routing": [],
    "moe.jitter_eps": [-0.1, 1.0],
    "moe.renormalize": [],
    "moe.num_shared_experts": [-1, BIG],
    "moe.expert_mlp": ["relu"],
    "moe.dispatch": ["fast"],
    "moe.load_balance_weight": [-1.0],
    "moe.z_loss_weight": [-1.0],
    "moe.bias_balancing": [],
    "moe.bias_rate": [-1.0],
    "moe.router_dtype": ["float16", "bfloat16-full"],
    "moe.router_logit_scale": [0.0, -1.0],
    "moe.router_init_scale": [0.0, -1.0],
    "moe.score_func": ["tanh", "Sigmoid"],
    "moe.routed_scale": [0.0, -1.0],
    "moe.num_groups": [0, -1, BIG, 3],  # 3 does not divide E=8
    "moe.groups_selected": [0, -1, BIG, 2],  # 2 > num_groups=1
    "moe.group_score": ["sum", "top2"],
    "moe.shared_expert_hidden": [0, -1, BIG],
    "moe.shared_expert_gate": [True],  # a gate on no shared experts
    "moe.k_rule": ["topp", "Top_p"],
    "moe.top_p": [0.0, -0.1, 1.5],
    "moe.k_min": [0, -1, 3],  # 3 > K=2
    "moe.target_k": [0.5, 2.5],  # outside [k_min, K] = [1, 2]
    "moe.top_p_rate": [-1.0],
    "moe.router_entropy_weight": [-1.0],
    "train.steps": [0, -1, 3_000_000_000],
    "train.batch_size": [0, -1, BIG],
    "train.learning_rate": [0.0, -1.0],
    "train.warmup_steps": [-1, BIG],
    "train.min_lr_ratio": [-0.1, 1.5],
    "train.weight_decay": [-0.1],
    "train.b1": [-0.1, 1.0],
    "train.b2": [-0.1, 1.0],
    "train.grad_clip": [-1.0],
    "train.decay_router": [],
    "train.spike_factor": [1.0, 0.5, -1.0],
    "train.spike_window": [0, -1, 100_001],
    "train.max_loss_spikes": [-1, BIG],
    "train.blowup_margin": [-0.1],
    "train.seed": [-1, SEED_MAX + 1],
    "train.log_every": [0, -1, BIG],
    "train.eval_every": [0, -1, BIG],
    "train.eval_batches": [-1, BIG],
    "train.checkpoint_every": [0, -1, BIG],
    "train.keep_checkpoints": [0, -1, BIG],
    "train.init_from": ["/nonexistent/run"],
    "train.upcycle": [True],  # without train.init_from
    "train.upcycle_noise": [-0.1],
    "train.trainable": ["experts", ""],
    "train.profile_steps": ["3:2", "0:5", "1:999", "2:", "abc"],  # train.steps is 500
    "train.wandb_project": [],  # any string (the type check only)
    "data.name": [""],
    "data.text_dir": [],
    "data.tfds_data_dir": [],
    "data.tokenizer": ["bpe", "hf:/nonexistent/tokenizer"],
    "data.sp_vocab_size": [0, 100, 2**21],
    "data.seq_len": [0, -1, 512],  # 512 > model.max_len=256
    "data.validation_fraction": [0.0, 1.0, -0.1],
    "data.num_workers": [-1, 5000],
    "mesh.data": [0, -2, 2, BIG],
    "mesh.fsdp": [0, -2, Says(2, FILL), Says(BIG, FILL), Says(-1, "mesh.data", "mesh.fsdp")],
    "mesh.expert": [0, -2, Says(2, FILL)],
    "mesh.tensor": [0, -2, Says(2, FILL)],
    "mesh.dcn_data": [0, -1, BIG],
}
# Values that are bad only beside another field's: (overrides, the field the error names).
COMBINATIONS = [
    ({"data.name": "textdir", "data.text_dir": ""}, "data.text_dir"),
    ({"moe.enabled": False, "train.trainable": "moe"}, "train.trainable"),
    ({"moe.enabled": False, "train.trainable": "router_frozen"}, "train.trainable"),
    ({"model.num_layers": 2, "model.first_moe_layer": 2}, "model.first_moe_layer"),
    ({"model.scan_layers": True, "model.moe_interval": 2}, "model.scan_layers"),
    ({"model.attention": "mla", "model.positions": "learned"}, "model.positions"),
    ({"model.attention": "mla", "model.qk_norm": "head"}, "model.qk_norm"),
    ({"model.rope_factor": 8.0}, "model.rope_factor"),  # rope_type "default" reads no factor
    ({"model.rope_type": "llama3", "model.rope_mscale": 1.0}, "model.rope_mscale"),
    ({"model.rope_type": "yarn", "model.rope_low_freq_factor": 2.0}, "model.rope_low_freq_factor"),
    ({"model.rope_type": "llama3", "model.positions": "learned"}, "model.positions"),
    ({"data.tokenizer": "sentencepiece", "data.sp_vocab_size": 300}, "data.sp_vocab_size"),
    ({"moe.k_rule": "top_p_target"}, "moe.target_k"),  # the controller needs a target
    ({"moe.k_rule": "top_p", "moe.router": "expert_choice",
      "moe.allow_noncausal_routing": True}, "moe.k_rule"),
    ({"moe.k_rule": "top_p_target", "moe.target_k": 1.5, "moe.k_min": 2}, "moe.target_k"),
    ({"moe.k_rule": "top_p_target", "moe.target_k": 1.5}, None),
    ({"model.vocab_size": 259}, None),  # legal: exactly the byte tokenizer's ids
    ({"model.rope_type": "yarn", "model.rope_factor": 4.0, "model.rope_original_max_len": 64,
      "model.rope_mscale": 0.707, "model.rope_mscale_all_dim": 1.0}, None),
    ({"model.rope_type": "llama3", "model.rope_factor": 8.0}, None),
    ({"model.vocab_size": 4096, "moe.capacity_factor": None, "model.sliding_window": 8}, None),
]


def default_fields() -> dict[str, type]:
  """"group.field" -> the declared type of every field of configs/default.py."""
  cfg = load_config_file("default")
  return {f"{group}.{field}": cfg[group].get_type(field)
          for group in cfg.keys() for field in cfg[group].keys()}


def cases() -> list[tuple[str, object, tuple[str, ...]]]:
  """(field, bad value, needles) for every field and kind of bad value."""
  out = []
  for field, kind in default_fields().items():
    values = BY_TYPE.get(kind, []) + ([] if field in OPTIONAL else [None]) + ROWS.get(field, [])
    for v in values:
      out.append((field, v.value, v.needles) if isinstance(v, Says) else (field, v, (field,)))
  return out


def validate(cfg) -> None:
  """What the trainer checks before compiling: validate_config (on one device, one process, as
  the table assumes), then the vocabulary against the (byte) tokenizer."""
  validate_config(cfg, num_devices=1, num_processes=1)
  check_vocab_size(cfg, ByteTokenizer().vocab_size)


def configured(overrides: dict):
  cfg = load_config_file("default")
  with cfg.ignore_type():
    return apply_overrides(cfg, overrides)


def readable(cfg) -> bool:
  """Whether every field can be read back: a field computed from another (configs/default.py's
  moe.eval_capacity_factor follows moe.capacity_factor) fails on a value of the wrong type."""
  try:
    for group in cfg.keys():
      dict(cfg[group])
    return True
  except TypeError:
    return False


def typed_config_refuses(field: str, value) -> bool:
  """Whether the typed ConfigDict refuses `field=value` outright (as it does without
  ignore_type(), and as launch.py's override parsing does)."""
  try:
    apply_overrides(load_config_file("default"), {field: value})
  except TypeError:
    return True
  return False


def test_every_field_has_a_row():
  fields = default_fields()
  missing = sorted(set(fields) - set(ROWS))
  assert not missing, f"add a row of bad values to ROWS in {__file__} for {missing}"
  assert not sorted(set(ROWS) - set(fields)), "ROWS names fields the default config lacks"
  unknown = {f: t for f, t in fields.items() if t not in BY_TYPE}
  assert not unknown, f"no bad values for the types of {unknown}: add them to BY_TYPE"


def test_the_default_config_passes():
  """The table's baseline is legal, so each error below comes from the one bad value."""
  validate(load_config_file("default"))
  for overrides, needle in COMBINATIONS:
    if needle is None:
      validate(configured(overrides))


def test_every_bad_value_of_every_field_is_one_line_naming_it():
  table = cases()
  assert len(table) >= 5 * len(ROWS)  # at least the type's bad values for every field
  failures, unreadable = [], []
  with CompileCounter() as compiles:
    for field, value, needles in table:
      cfg = configured({field: value})
      if not readable(cfg):  # no config can hold it: the typed ConfigDict refuses it first
        assert typed_config_refuses(field, value), (field, value)
        unreadable.append(field)
        continue
      group, name = field.split(".")
      stored = cfg[group][name]
      assert type(stored) is type(value) and (stored == value or stored != stored), (
          f"the ConfigDict turned {field}={value!r} into {stored!r}: the row tests nothing")
      try:
        with one_line_error(*needles):
          validate(cfg)
      except (Exception, pytest.fail.Exception) as e:  # gather every failing row
        failures.append(f"{field}={value!r}: {type(e).__name__}: {e}".splitlines()[0])
  assert not failures, f"{len(failures)} of {len(table)} not refused as they should be:\n" + \
      "\n".join(failures)
  assert compiles.count == 0
  assert len(unreadable) <= 3, unreadable  # only strings into moe.capacity_factor, which
  # moe.eval_capacity_factor follows (launch.py's parsing refuses them: see the cases below)


@pytest.mark.parametrize("overrides, needle", [c for c in COMBINATIONS if c[1]])
def test_values_bad_beside_another_field(overrides, needle):
  with one_line_error(needle):
    validate(configured(overrides))


# ----------------------------------------------------------------------------- launch.py


@pytest.mark.parametrize("flags, needles", [
    (["--config.train.learning_rate=inf"], ("train.learning_rate", "finite")),
    (["--config.train.weight_decay=inf"], ("train.weight_decay",)),
    (["--config.model.vocab_size=10"], ("model.vocab_size=10", "259")),
    (["--config.model.norm_eps=-1.0"], ("model.norm_eps",)),
    (["--config.model.rope_theta=0.0"], ("model.rope_theta",)),
    (["--config.model.logits_soft_cap=0.0"], ("model.logits_soft_cap",)),
    (["--config.moe.load_balance_weight=nan"], ("moe.load_balance_weight",)),
    (["--config.model.first_moe_layer=5"], ("model.first_moe_layer", "model.num_layers (2)")),
    (["--config.train.steps=3000000000"], ("train.steps", str(INT32_MAX))),
    (["--config.model.remat=yes"], ("remat",)),  # refused by the typed ConfigDict's parsing
    (["--config.moe.capacity_factor=abc"], ("capacity_factor",)),
    (["--config.model.d_model=None"], ("model.d_model",)),  # set by launch.py, refused after
])
def test_launch_train_refuses(tmp_path, tiny_flags, flags, needles):
  """Exit 2, one `error:` line naming the field, no traceback (the tiny config, so a value that
  slipped through would train rather than hang on the default data)."""
  proc = run_launch(["--config=configs/default.py", f"--workdir={tmp_path / 'run'}",
                     *tiny_flags(), *flags])
  assert_one_line_error(proc, *needles)


@pytest.mark.parametrize("flag, needle", [("--temperature=nan", "--temperature"),
                                          ("--top_p=inf", "--top_p")])
def test_launch_complete_refuses_bad_sampling_flags(tmp_path, flag, needle):
  """Checked before any model work: the workdir has no checkpoint, and the flag's error wins."""
  proc = run_launch(["--config=configs/default.py", f"--workdir={tmp_path}", "--mode=complete",
                     "--prompt=def f", flag])
  assert_one_line_error(proc, needle)


@pytest.mark.parametrize("flags, needle", [
    (dict(temperature=NAN), "--temperature"), (dict(temperature=-1.0), "--temperature"),
    (dict(temperature=INF), "--temperature"), (dict(top_p=NAN), "--top_p"),
    (dict(top_p=0.0), "--top_p"), (dict(top_p=1.5), "--top_p"),
    (dict(max_new_tokens=0), "--max_new_tokens"), (dict(max_new_tokens=BIG), "--max_new_tokens"),
    (dict(max_new_tokens=2.5), "--max_new_tokens"), (dict(seed=-1), "--seed"),
    (dict(seed=SEED_MAX + 1), "--seed"),
])
def test_generate_checks_sampling_flags_before_the_checkpoint(tmp_path, flags, needle):
  """generate.main (launch.py's --mode=complete) refuses each flag before it looks for a model:
  the empty workdir's own error ("no checkpoint") would come first otherwise."""
  from moe.inference import generate
  with one_line_error(needle):
    generate.main(load_config_file("default"), str(tmp_path), prompt="def f", **flags)
