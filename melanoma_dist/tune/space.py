"""The search space of `tune.space`: dotted config keys and their distributions, checked at config load.

Written in the config as text, one key each:

```yaml
tune:
  space:
    train.learning_rate: loguniform(1e-4, 3e-3)
    pipeline.batch_size: choice([32, 64])
    train.epochs: grid([4, 8])
    model.dropout: uniform(0.0, 0.5)
```

Only keys of the `pipeline`, `model` and `train` sections can be searched: the data, the
folds and the cluster must be the same for every trial, or their scores would not compare.
An unknown key fails at load and lists the valid ones; every value a trial can draw (the
bounds of a range, each choice) must give a valid config. This module imports no Ray:
`to_tune` converts a dimension to Ray Tune's distribution when the search starts.

Example:

```python
dims = parse_space({"train.learning_rate": "loguniform(1e-4, 3e-3)"})
dims[0].kind, dims[0].values  # ('loguniform', (0.0001, 0.003))
```
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from melanoma_dist.config import Config, ConfigError, config_from_dict

KINDS = ("loguniform", "uniform", "choice", "grid")
SEARCHABLE_SECTIONS = ("pipeline", "model", "train")
_EXPRESSION = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Dimension:
    """One searched config key."""

    key: str
    """Dotted config key, e.g. `train.learning_rate`."""
    kind: str
    """One of `KINDS`."""
    values: tuple
    """(low, high) for loguniform/uniform; the values for choice/grid."""
    integer: bool = False
    """The key holds an integer: a range draws integers (both bounds included)."""

    def candidates(self) -> list[Any]:
        """The values checked at load: the bounds of a range, every choice."""
        return list(self.values)

    def to_tune(self) -> Any:
        """Ray Tune's distribution for this dimension (`grid` as a grid search)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.integer:  # Tune's integer ranges exclude the upper bound
            return (tune.lograndint if self.kind == "loguniform" else tune.randint)(int(low), int(high) + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)


def searchable_keys() -> dict[str, Any]:
    """Every dotted key that can be searched, with its annotated type."""
    out: dict[str, Any] = {}

    def walk(tp: Any, prefix: str) -> None:
        for name, hint in typing.get_type_hints(tp).items():
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = hint

    for section in SEARCHABLE_SECTIONS:
        walk(typing.get_type_hints(Config)[section], f"{section}.")
    return out


def _is_number_type(tp: Any) -> bool:
    return tp in (int, float)


def parse_dimension(key: str, text: str, field_type: Any) -> Dimension:
    """Parse `kind(args)` for the config key `key` of type `field_type`.

    Raises:
        ConfigError: the text is not one of `KINDS` with fitting arguments.
    """
    where = f"tune.space.{key}"
    m = _EXPRESSION.match(str(text))
    if not m or m.group(1) not in KINDS:
        raise ConfigError(f"{where} is {text!r}: write one of {[k + '(...)' for k in KINDS]}, e.g. "
                          f"loguniform(1e-4, 3e-3) or choice([32, 64])")
    kind, inner = m.group(1), m.group(2)
    try:
        args = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot read the arguments of {text!r}: {e}") from None
    if kind in ("choice", "grid"):
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        if not values:
            raise ConfigError(f"{where}: {kind}() needs at least one value, e.g. {kind}([32, 64])")
        if typing.get_origin(field_type) is tuple:  # lists (model.filters) are stored as tuples
            values = [tuple(v) if isinstance(v, list) else v for v in values]
        return Dimension(key, kind, tuple(values))
    if not _is_number_type(field_type):
        raise ConfigError(f"{where}: {kind}() needs a numeric key, but {key} is {getattr(field_type, '__name__', field_type)}: "
                          f"use choice([...]) or grid([...])")
    nums = [float(a) if isinstance(a, str) else a for a in args] if len(args) == 2 else []
    if len(nums) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in nums):
        raise ConfigError(f"{where}: {kind}() takes two numbers (low, high), got {text!r}")
    low, high = nums
    if not low < high:
        raise ConfigError(f"{where}: {kind}({low}, {high}) needs low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform({low}, {high}) needs low > 0; use uniform for ranges from 0")
    integer = field_type is int
    if integer and (int(low) != low or int(high) != high):
        raise ConfigError(f"{where}: {key} is an integer: give integer bounds, got {kind}({low}, {high})")
    return Dimension(key, kind, (int(low), int(high)) if integer else (float(low), float(high)), integer)


def parse_space(space: Mapping[str, str]) -> list[Dimension]:
    """The dimensions of `tune.space`, in the order given.

    Raises:
        ConfigError: a key is not searchable (the message lists the valid keys) or a
            distribution is malformed.
    """
    keys = searchable_keys()
    dims = []
    for key, text in space.items():
        if key not in keys:
            section = key.split(".")[0]
            why = (f"the {section} section cannot be searched (every trial must use the same data, folds and "
                   f"cluster)" if section in ("data", "folds", "distributed", "tune", "output_dir")
                   else f"unknown config key {key!r}")
            raise ConfigError(f"tune.space: {why}; valid keys: {sorted(keys)}")
        dims.append(parse_dimension(key, text, keys[key]))
    return dims


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` in a raw config dict, in place (sections created as needed)."""
    node = raw
    *sections, last = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[last] = list(value) if isinstance(value, tuple) else value


def trial_dict(base: Config | Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The raw config of a trial: `base` with the trial's values, and no `tune` section."""
    raw = json.loads(json.dumps(base.to_dict() if isinstance(base, Config) else base))
    raw.pop("tune", None)
    for key, value in params.items():
        set_key(raw, key, value)
    return raw


def metric_name(cfg: Config) -> str:
    """The metric the search maximises: `roc_auc` or `balanced_accuracy`."""
    if cfg.tune.metric != "auto":
        return cfg.tune.metric
    return "balanced_accuracy" if cfg.data.label_scheme == "ham7" else "roc_auc"


def largest_epochs(cfg: Config, dims: list[Dimension]) -> int:
    """The most epochs a trial can train: the top of `train.epochs` in the space, else the base's."""
    for d in dims:
        if d.key == "train.epochs":
            return int(max(d.values))
    return cfg.train.epochs


def check_tune_section(cfg: Config) -> None:
    """Check `cfg.tune` against the rest of `cfg`: the space, each value it can draw, the metric.

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    t = cfg.tune
    if t.metric == "roc_auc" and cfg.data.label_scheme == "ham7":
        raise ConfigError("tune.metric=roc_auc needs a two-class label scheme (ROC-AUC per epoch is computed for "
                          "two classes only); for ham7 use balanced_accuracy or auto")
    dims = parse_space(t.space)
    for d in dims:
        if t.search_algorithm == "grid" and d.kind not in ("grid", "choice"):
            raise ConfigError(f"tune.space.{d.key}: {d.kind}() cannot be enumerated by search_algorithm=grid: "
                              f"use grid([...]) or choice([...]), or search_algorithm=random")
        if t.search_algorithm == "tpe" and d.kind == "grid":
            raise ConfigError(f"tune.space.{d.key}: grid() is not supported by search_algorithm=tpe: use choice([...])")
        for value in d.candidates():
            try:
                config_from_dict(trial_dict(cfg, {d.key: value}))
            except ConfigError as e:
                raise ConfigError(f"tune.space.{d.key}: the value {value!r} gives an invalid config: {e}") from None
    if t.max_epochs and t.max_epochs < largest_epochs(cfg, dims):
        raise ConfigError(f"tune.max_epochs={t.max_epochs} is below the {largest_epochs(cfg, dims)} epochs a trial "
                          f"can train: ASHA would cut such trials before they finish; raise it or set 0 (automatic)")


