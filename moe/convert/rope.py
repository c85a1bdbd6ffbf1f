"""Rotary-embedding settings of every family: Hugging Face `rope_parameters` (or the older
`rope_scaling`, with `type` for `rope_type`, and a top-level `rope_theta`) <-> the `model.rope_*`
fields of `moe.model.config.ModelConfig`.

  rope_theta                       -> model.rope_theta
  rope_type                        -> model.rope_type: "default" | "llama3" | "yarn"
  factor                           -> model.rope_factor (yarn without one: max_position_embeddings
                                      / original_max_position_embeddings, as transformers)
  original_max_position_embeddings -> model.rope_original_max_len (a top-level one wins, and
                                      max_position_embeddings stands in when absent)
  llama3: low_freq_factor, high_freq_factor -> model.rope_low_freq_factor, rope_high_freq_factor
  yarn: beta_fast, beta_slow (0 or absent: 32, 1), truncate (absent: True), attention_factor,
        mscale, mscale_all_dim (0 or absent: None) -> model.rope_beta_fast, ... rope_mscale_all_dim

Any other rope_type ("linear", "dynamic", "longrope", ...), a partial_rotary_factor below 1 or
per-layer rope parameters are refused in one line naming them. Export writes the same keys back:
the ones transformers needs, and the optional yarn keys a checkpoint had (attention_factor,
mscale, mscale_all_dim, and truncate when False).
"""

from __future__ import annotations

from moe.errors import ConfigError
from moe.model.config import ROPE_TYPE_FIELDS, ModelConfig

SCALED = tuple(t for t in ROPE_TYPE_FIELDS if t != "default")  # rope types with scaling
ROPE_FIELDS = ("rope_type",) + tuple(sorted({f for fs in ROPE_TYPE_FIELDS.values() for f in fs}))


def _params(hf: dict) -> dict:
  rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  return rp if isinstance(rp, dict) else {}


def _required(rp: dict, key: str, where: str, kind: str):
  if rp.get(key) is None:
    raise ConfigError(f"{where}: rope_type={kind!r} needs rope_parameters[{key!r}]")
  return rp[key]


def rope_fields(hf: dict, where: str, default_theta: float = 10000.0) -> dict:
  """The `model.rope_*` fields of a Hugging Face config.json (see the module docstring); a
  one-line ConfigError for what this project does not compute."""
  rp = _params(hf)
  nested = sorted(k for k, v in rp.items() if isinstance(v, dict))
  if nested:
    raise ConfigError(f"{where}: rope parameters per layer type {nested} are not supported")
  kind = rp.get("rope_type", rp.get("type")) or "default"
  if kind not in ROPE_TYPE_FIELDS:
    raise ConfigError(f"{where}: rope_type={kind!r} is not supported (only "
                      + ", ".join(repr(t) for t in ROPE_TYPE_FIELDS) + ")")
  partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial is not None and float(partial) != 1.0:
    raise ConfigError(f"{where}: partial_rotary_factor={partial!r} is not supported (every "
                      "feature of the head is rotated)")
  theta = rp.get("rope_theta")
  out = {"rope_theta": float(theta if theta is not None else hf.get("rope_theta", default_theta)),
         "rope_type": kind}
  if kind == "default":
    return out
  max_len = int(hf.get("max_position_embeddings", 4096))
  original = hf.get("original_max_position_embeddings") or rp.get(
      "original_max_position_embeddings") or max_len
  out["rope_original_max_len"] = int(original)
  if kind == "llama3":
    out.update(rope_factor=float(_required(rp, "factor", where, kind)),
               rope_low_freq_factor=float(_required(rp, "low_freq_factor", where, kind)),
               rope_high_freq_factor=float(_required(rp, "high_freq_factor", where, kind)))
    return out
  factor = rp.get("factor")
  optional = lambda key: float(rp[key]) if rp.get(key) else None  # noqa: E731  (0 = absent)
  out.update(rope_factor=float(factor if factor is not None else max_len / int(original)),
             rope_beta_fast=float(rp.get("beta_fast") or 32.0),
             rope_beta_slow=float(rp.get("beta_slow") or 1.0),
             rope_truncate=bool(rp.get("truncate", True)),
             rope_attention_factor=(None if rp.get("attention_factor") is None
                                    else float(rp["attention_factor"])),
             rope_mscale=optional("mscale"), rope_mscale_all_dim=optional("mscale_all_dim"))
  return out


def _field(model: dict, name: str):
  """model[name], or the field's default for a config written before the field existed."""
  return model.get(name, ModelConfig.__dataclass_fields__[name].default)


def rope_config(model: dict) -> dict:
  """The config.json entries `rope_fields` reads back: `rope_theta` and `rope_parameters`."""
  theta, kind = model["rope_theta"], _field(model, "rope_type")
  rp = {"rope_theta": theta, "rope_type": kind}
  if kind in SCALED:
    rp["factor"] = _field(model, "rope_factor")
    rp["original_max_position_embeddings"] = (_field(model, "rope_original_max_len")
                                              or model["max_len"])
  if kind == "llama3":
    rp.update(low_freq_factor=_field(model, "rope_low_freq_factor"),
              high_freq_factor=_field(model, "rope_high_freq_factor"))
  elif kind == "yarn":
    rp.update(beta_fast=_field(model, "rope_beta_fast"), beta_slow=_field(model, "rope_beta_slow"))
    if not _field(model, "rope_truncate"):
      rp["truncate"] = False
    for ours, theirs in (("rope_attention_factor", "attention_factor"), ("rope_mscale", "mscale"),
                         ("rope_mscale_all_dim", "mscale_all_dim")):
      if _field(model, ours) is not None:
        rp[theirs] = _field(model, ours)
  return {"rope_theta": theta, "rope_parameters": rp}
