"""Checks of command-line overrides (`key=value`) against the LazyConfig they change.

:func:`check_override_keys` refuses a key the config lacks (with close matches);
:func:`apply_checked_overrides` applies the overrides and refuses a value whose type does not fit
the config's default, naming the key and the expected type:

=================  =============================================================================
default            accepted values
=================  =============================================================================
None               anything (the key is optional: None means "off" or "decide for me")
bool               true / false only (1, "yes", null are refused: a switch has two states)
int                an int, or null
float              an int or a float (stored as float), or null
str                a str, or null; numbers and true / false are kept as the text typed
list / tuple       a list (elements checked like scalars when the default's are all one type)
dict               a dict (merged into the default, as OmegaConf does)
interpolation      checked against the value it resolves to; a new interpolation is not checked
other objects      not checked (classes, functions)
=================  =============================================================================

null is accepted for int / float / str keys because None means "off" for many of them
(`train.clip_grad_norm`, `train.checkpointer.max_to_keep`).
"""

from __future__ import annotations

import difflib

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from rankdetr.errors import UserError

__all__ = [
    "ConfigError",
    "apply_checked_overrides",
    "check_override_keys",
    "check_train_values",
]

_MISSING = object()
_SCALARS = (bool, int, float, str)


class ConfigError(KeyError, UserError):
    """A config or override that cannot work; the message names the key."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


# --- keys -----------------------------------------------------------------------------------


def _override_key(override: str) -> str:
    if "=" not in override and not override.startswith("~"):
        raise ConfigError(f"override {override!r} is not of the form key=value")
    return override.split("=", 1)[0].strip()


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}{key}"
            keys.append(path)
            keys += _all_keys(node._get_node(key), path + ".")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            keys += _all_keys(node._get_node(index), f"{prefix}{index}.")
    return keys


def check_override_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Raise ConfigError naming an overridden key that the config lacks, with close matches.

    A leading "+" (hydra's syntax for adding a key) or "~" (deleting one) skips the check.
    """
    known = None
    for override in overrides:
        key = _override_key(override)
        if key.startswith(("+", "~")):
            continue
        if _raw_value(cfg, key)[0] is not _MISSING:
            continue
        known = known or _all_keys(cfg)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"config has no key {key!r} (from override {override!r}){hint}")


def _raw_value(cfg: DictConfig, key: str) -> tuple[object, bool]:
    """(value without resolving interpolations, whether it is an interpolation); value is
    _MISSING when the key does not exist. Containers are returned as DictConfig / ListConfig."""
    parent_key, _, leaf = key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    except Exception:  # e.g. an interpolation on the way that does not resolve
        return _MISSING, False
    if isinstance(parent, ListConfig):
        if not leaf.lstrip("-").isdigit() or not -len(parent) <= int(leaf) < len(parent):
            return _MISSING, False
        node = parent._get_node(int(leaf))
    elif isinstance(parent, DictConfig) and leaf in parent:
        node = parent._get_node(leaf)
    else:
        return _MISSING, False
    if isinstance(node, (DictConfig, ListConfig)):
        return node, False
    return node._value(), node._is_interpolation()


# --- types ----------------------------------------------------------------------------------


def apply_checked_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """:func:`check_override_keys`, then LazyConfig.apply_overrides, then a type check of every
    overridden value against the default it replaced (rules in the module docstring).

    Raises:
        ConfigError: "<key> expects <type>, got <value> (from override '<override>')".
    """
    check_override_keys(cfg, overrides)
    defaults, last = {}, {}
    for override in overrides:
        key = _override_key(override)
        if not key.startswith(("+", "~")):
            defaults.setdefault(key, _default_for_check(cfg, key))
            last[key] = override  # a key given twice: its last value is the one applied
    for override in overrides:
        _apply_one(cfg, override)
    for key, override in last.items():
        _check_value(cfg, key, defaults[key], override)
    check_train_values(cfg)
    return cfg


# (key, smallest value): counts and periods of the train node that must be whole numbers.
_TRAIN_COUNTS = (
    ("train.max_iter", 1),
    ("train.checkpointer.period", 1),
    ("train.eval_period", 0),
    ("train.log_period", 1),
)


def check_train_values(cfg: DictConfig) -> None:
    """The train node's iteration counts and periods are integers in range (0 for eval_period
    means no evaluation during training), so a bad value is one line before anything starts."""
    for key, smallest in _TRAIN_COUNTS:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not _is_int(value) or value < smallest:
            raise ConfigError(f"{key} must be an integer >= {smallest}, got {value!r}")


def _apply_one(cfg: DictConfig, override: str) -> None:
    # One at a time, so that a syntax error names its override.
    try:
        LazyConfig.apply_overrides(cfg, [override])
    except Exception as error:  # hydra's parse errors, deletion (unsupported), non-config parents
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot apply override {override!r}: {message}") from error


def _default_for_check(cfg: DictConfig, key: str):
    """The default as a plain value to compare types with; interpolations resolved (None when
    they do not resolve: then any value goes)."""
    value, is_interpolation = _raw_value(cfg, key)
    if is_interpolation:
        try:
            value = OmegaConf.select(cfg, key)
        except Exception:
            return None
    if isinstance(value, ListConfig):
        return [value._get_node(i)._value() for i in range(len(value))]
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_value(cfg: DictConfig, key: str, default, override: str) -> None:
    value, is_interpolation = _raw_value(cfg, key)
    if is_interpolation or default is None:
        return
    text = override.split("=", 1)[1].strip()
    if isinstance(default, str) and isinstance(value, (bool, int, float)):
        # hydra parsed "5" as 5: for a str key the user meant the text.
        OmegaConf.update(cfg, key, text, merge=False)
        return
    if isinstance(default, float) and _is_int(value):
        OmegaConf.update(cfg, key, float(value), merge=False)
        return
    problem = _type_problem(default, value)
    if problem:
        raise ConfigError(f"{key} {problem}, got {text!r} (from override {override!r})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(default, value) -> str | None:
    """None when `value` may replace `default`, else "expects <type>"."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expects a bool (true or false)"
    if isinstance(default, (int, float, str)):
        if value is None or _scalar_fits(default, value):
            return None
        return f"expects {_type_name(default)}"
    if isinstance(default, list):
        if not isinstance(value, (ListConfig, list, tuple)):
            return "expects a list, e.g. [1,2]"
        return _element_problem(default, list(value))
    if isinstance(default, (DictConfig, dict)):
        return None if isinstance(value, (DictConfig, dict)) else "expects a dict, e.g. {a:1}"
    return None  # classes, functions and other objects: not checked


def _scalar_fits(default, value) -> bool:
    if isinstance(default, float):
        return isinstance(value, float) or _is_int(value)
    if isinstance(default, int):
        return _is_int(value)
    return isinstance(value, str)


def _type_name(default) -> str:
    if isinstance(default, bool):
        return "a bool"
    return {int: "an int", float: "a float", str: "a str"}[type(default)]


def _element_problem(default: list, value: list) -> str | None:
    """A list of one scalar type must stay a list of that type (ints allowed for floats)."""
    kinds = {type(element) for element in default}
    if len(kinds) != 1 or not issubclass(next(iter(kinds)), _SCALARS):
        return None
    example = default[0]
    bad = [element for element in value if not _element_fits(example, element)]
    if not bad:
        return None
    return f"expects a list of {type(example).__name__} (element {bad[0]!r} is not)"


def _element_fits(example, element) -> bool:
    if isinstance(example, bool):
        return isinstance(element, bool)
    return _scalar_fits(example, element)
