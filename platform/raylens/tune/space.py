"""Search spaces (``tune_spaces/*.yaml``): dotted config keys mapped to distributions.

A space file::

    space:
      train.lr:           {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      task.focal_gamma:   {type: uniform, low: 0.5, high: 4.0}
      model.unfreeze_last_n: {type: int, low: 0, high: 4}
      metric.miner:       {type: choice, values: [none, multi_similarity]}
      metric.miner_epsilon:
        {type: uniform, low: 0.05, high: 0.3, when: {metric.miner: multi_similarity}}
    fixed:                # optional: overrides every trial shares
      train.epochs: 4

Distributions: ``loguniform`` / ``uniform`` (``low``, ``high``, optional ``step`` for
uniform), ``int`` (``low``, ``high``, optional ``log``, ``step``), ``choice``
(``values``). ``when`` makes a parameter conditional: it is sampled only when every named
key has one of the given values (a list: any of them); a condition may name a parameter
listed earlier in the space or any config key (its value in the trial's config).

:func:`load_space` validates everything against the run config schema before any trial
starts: an unknown key is named (with the nearest valid one), and the bounds and choices
must be values the key accepts. Pure: no Ray; Optuna is imported only to sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from raylens import config as C
from raylens.config import ConfigError
from raylens.schema import RunConfig

KINDS = ("loguniform", "uniform", "int", "choice")
_FIELDS = {
    "loguniform": {"type", "low", "high", "when"},
    "uniform": {"type", "low", "high", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "choice": {"type", "values", "when"},
}


@dataclass
class Param:
    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Space:
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # the parsed file (resume compares it)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def active(self, p: Param, chosen: dict[str, Any], cfg: RunConfig) -> bool:
        """Whether ``p``'s conditions hold, given the values chosen so far in a trial."""
        for key, allowed in p.when.items():
            value = chosen[key] if key in chosen else _get(cfg, key)
            if value not in allowed:
                return False
        return True

    def suggest(self, trial: Any, cfg: RunConfig) -> dict[str, Any]:
        """Samples one trial's overrides from an ``optuna.Trial`` (define-by-run)."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if not self.active(p, chosen, cfg):
                continue
            if p.kind == "choice":
                chosen[p.key] = trial.suggest_categorical(p.key, p.values)
            elif p.kind == "int":
                chosen[p.key] = trial.suggest_int(
                    p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
                )
            else:
                chosen[p.key] = trial.suggest_float(
                    p.key, p.low, p.high, log=p.kind == "loguniform", step=p.step
                )
        return chosen


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return list(cfg) if isinstance(cfg, tuple) else cfg


def _check_value(base: RunConfig, key: str, value: Any, where: str) -> None:
    """The key accepts ``value`` (type, literal choices, section validation)."""
    try:
        cfg = C.apply_overrides(base, {key: value})
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_key(key: str, valid: list[str], leaves: set[str], where: str) -> None:
    if key in leaves:
        return
    if key in valid:
        raise ConfigError(f"{where}: '{key}' is a section; name one of its keys")
    raise ConfigError(f"{where}: {C._unknown(key, valid)}")


def parse_space(data: Any, base: RunConfig | None = None, source: str = "space") -> Space:
    """Validates a parsed space file against the schema (and ``base``, the run's config)."""
    base = base or RunConfig()
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict) or not data["space"]:
        raise ConfigError(f"{source}: expected a mapping with a non-empty 'space:' section")
    extra = set(data) - {"space", "fixed"}
    if extra:
        raise ConfigError(f"{source}: unknown section(s) {sorted(extra)}; expected space, fixed")
    valid = C.all_keys(RunConfig)
    leaves = {k for k, *_ in C.iter_fields(RunConfig)}
    fixed = dict(data.get("fixed") or {})
    for key, value in fixed.items():
        _check_key(key, valid, leaves, f"{source}: fixed key '{key}'")
        _check_value(base, key, value, f"{source}: fixed '{key}'")
    base = C.apply_overrides(base, fixed) if fixed else base
    params: list[Param] = []
    for key, spec in data["space"].items():
        where = f"{source}: space key '{key}'"
        _check_key(key, valid, leaves, where)
        if key in fixed:
            raise ConfigError(f"{where}: also listed under 'fixed'")
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            raise ConfigError(f"{where}: expected a mapping with type one of {list(KINDS)}")
        kind = spec["type"]
        unknown = set(spec) - _FIELDS[kind]
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {sorted(unknown)} for type {kind}; "
                f"expected {sorted(_FIELDS[kind])}"
            )
        p = Param(key, kind, log=bool(spec.get("log", False)))
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: choice needs a non-empty 'values' list")
            for v in values:
                _check_value(base, key, v, where)
            p.values = values
        else:
            try:
                p.low, p.high = float(spec["low"]), float(spec["high"])
                p.step = float(spec["step"]) if spec.get("step") is not None else None
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{where}: {kind} needs numeric 'low' and 'high'") from None
            if not p.low <= p.high:
                raise ConfigError(f"{where}: expected low <= high, got {p.low} > {p.high}")
            if kind == "loguniform" and p.low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {p.low}")
            if kind == "int":
                if p.low != math.floor(p.low) or p.high != math.floor(p.high):
                    raise ConfigError(f"{where}: int needs integer bounds")
                bounds = (int(p.low), int(p.high))
            else:
                bounds = (p.low, p.high)
            for v in bounds:
                _check_value(base, key, v, where)
        when = spec.get("when") or {}
        if not isinstance(when, dict):
            raise ConfigError(f"{where}: 'when' expected a mapping of key: value(s)")
        for wkey, wval in when.items():
            _check_key(wkey, valid, leaves, f"{where}: condition")
            later = [q.key for q in params]
            if wkey in data["space"] and wkey not in later:
                raise ConfigError(
                    f"{where}: condition on '{wkey}', which is sampled later; list it first"
                )
            p.when[wkey] = list(wval) if isinstance(wval, list) else [wval]
        params.append(p)
    return Space(params, fixed, source, data)


def load_space(text: str, base: RunConfig | None = None, source: str = "space") -> Space:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    return parse_space(data, base, source)
