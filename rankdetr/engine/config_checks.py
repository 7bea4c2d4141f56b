"""Checks of a LazyConfig and of the command-line overrides (`key=value`) that change it.

* **Unknown keys.** Overrides are applied with the config in OmegaConf's struct mode, which
  refuses a key the config lacks; difflib names close matches. A leading "+" (hydra's syntax
  for adding a key) opens the config for that override.
* **Renamed keys.** The `train` node uses detrex's names; an old name, in an override or set by
  a config file, is refused with the new one (:data:`RENAMED_KEYS`).
* **Types.** A value must fit the default it replaces: a bool takes true / false only; an int an
  int; a float an int or a float (stored as float); a str anything (a number is kept as the text
  typed); a list a list (checked per element when the default's elements are all of one scalar
  type); a dict a dict. None (null) is accepted for int / float / str keys, since None means
  "off" for many of them, and for the dict nodes that None turns off
  (:data:`NODES_NONE_TURNS_OFF`). A default of None, an interpolation typed as the value, and
  other objects (classes, functions) are not checked; an interpolation as the default is checked
  against the value it resolves to.
"""

from __future__ import annotations

import difflib

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, flag_override

from rankdetr.errors import UserError

__all__ = ["ConfigError", "RENAMED_KEYS", "apply_checked_overrides", "check_renamed_keys",
           "check_train_values"]  # fmt: skip

# Old rankdetr key -> detrex's name for it (a key below an old node maps the same way).
RENAMED_KEYS = {
    "train.clip_grad_norm": "train.clip_grad.params.max_norm (with train.clip_grad.enabled)",
    "train.ema": "train.model_ema",
    "train.ema.evaluate_average": "train.model_ema.use_ema_weights_for_eval_only",
}
_AMP_HINT = (
    "train.amp is a node as in detrex: train.amp.enabled=True train.amp.dtype=bf16 (or fp16)"
)
# Dict nodes that may be set to None: the component is then left out.
NODES_NONE_TURNS_OFF = ("dataloader.evaluator",)  # no evaluation (rankdetr.engine.runner.do_test)
_TYPE_NAMES = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a str"}


class ConfigError(KeyError, UserError):
    """A config or override that cannot work; the message names the key."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


# --- renamed keys ---------------------------------------------------------------------------


def new_name_of(key: str) -> str | None:
    """detrex's name for an old key (or a key below an old node), else None."""
    for old in sorted(RENAMED_KEYS, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return RENAMED_KEYS[old] + key[len(old) :]
    return None


def check_renamed_keys(cfg: DictConfig, source: str) -> None:
    """Refuse a config (file) that sets a key by its old name, naming the new one."""
    train = cfg.get("train")
    if not isinstance(train, DictConfig):
        return
    if "amp" in train and not isinstance(train._get_node("amp"), DictConfig):
        raise ConfigError(f"{source} sets train.amp={train.amp!r}; {_AMP_HINT}")
    for old in RENAMED_KEYS:
        if OmegaConf.select(cfg, old, default=None, throw_on_resolution_failure=False) is not None:
            raise ConfigError(f"{source} sets {old}, renamed to {new_name_of(old)} (detrex's name)")


def _refuse_renamed_override(key: str, override: str) -> None:
    if key == "train.amp" and not override.split("=", 1)[1].strip().startswith("{"):
        raise ConfigError(f"override {override!r}: {_AMP_HINT}")
    new = new_name_of(key)
    if new is not None:
        raise ConfigError(f"override {override!r}: {key} was renamed to {new} (detrex's name)")


# --- unknown keys ---------------------------------------------------------------------------


def _override_key(override: str) -> str:
    if "=" not in override and not override.startswith("~"):
        raise ConfigError(f"override {override!r} is not of the form key=value")
    return override.split("=", 1)[0].strip()


def _all_keys(node, prefix: str = "") -> list[str]:
    """Every key path of a config, containers and leaves, for close matches."""
    if isinstance(node, DictConfig):
        children = [(str(key), node._get_node(key)) for key in node]
    elif isinstance(node, ListConfig):
        children = [(str(index), node._get_node(index)) for index in range(len(node))]
    else:
        return []
    keys = []
    for name, child in children:
        keys += [prefix + name] + _all_keys(child, f"{prefix}{name}.")
    return keys


def _apply_one(cfg: DictConfig, override: str, key: str) -> None:
    """Apply one override (so that an error names it) in struct mode: an unknown key is refused
    with close matches."""
    try:
        with flag_override(cfg, "struct", not key.startswith("+")):
            LazyConfig.apply_overrides(cfg, [override])
    except (AttributeError, KeyError, IndexError) as error:  # OmegaConf's "not in struct" & co.
        missing = getattr(error, "full_key", None) or key
        missing = missing if missing.startswith(key) else key
        close = difflib.get_close_matches(missing, _all_keys(cfg), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"config has no key {missing!r} (from override {override!r}){hint}"
        ) from None
    except Exception as error:  # hydra's parse errors, deletion (unsupported)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot apply override {override!r}: {message}") from error


# --- types ----------------------------------------------------------------------------------


def apply_checked_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply `overrides` to `cfg`, refusing unknown and renamed keys and values whose type does
    not fit the default they replace (rules in the module docstring); then check the train
    node's counts. A key given twice is checked with its last value.

    Raises:
        ConfigError naming the key, the override and what is expected.
    """
    defaults, last = {}, {}
    for override in overrides:
        key = _override_key(override)
        if not key.startswith(("+", "~")):
            _refuse_renamed_override(key, override)
            if key not in defaults:
                defaults[key] = _plain(_select(cfg, key))
            last[key] = override
        _apply_one(cfg, override, key)
    for key, override in last.items():
        _check_value(cfg, key, defaults[key], override)
    check_train_values(cfg)
    return cfg


def _select(cfg: DictConfig, key: str):
    """The value at `key` with interpolations resolved; None when absent or unresolvable."""
    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def _check_value(cfg: DictConfig, key: str, default, override: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = _select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, ListConfig):
        leaf = int(leaf)
    if default is None or OmegaConf.is_interpolation(parent, leaf):
        return
    value, text = parent[leaf], override.split("=", 1)[1].strip()
    if isinstance(default, str) and isinstance(value, (bool, int, float)):
        value = parent[leaf] = text  # hydra parsed "5" as 5: for a str key the user meant text
    elif isinstance(default, float) and _fits(1, value):
        value = parent[leaf] = float(value)
    if key in NODES_NONE_TURNS_OFF and value in (None, "None", "none", "null"):
        parent[leaf] = None  # hydra's parser reads "None" as text
        return
    problem = _type_problem(default, value)
    if problem:
        raise ConfigError(f"{key} {problem}, got {text!r} (from override {override!r})")


def _type_problem(default, value) -> str | None:
    """None when `value` may replace `default`, else "expects <what>"."""
    if isinstance(default, list):
        if not isinstance(value, ListConfig):
            return "expects a list, e.g. [1,2]"
        kinds = {type(element) for element in default}
        if len(kinds) != 1 or kinds.pop() not in _TYPE_NAMES:
            return None  # a mixed list, or one of objects: elements not checked
        bad = [element for element in value if not _fits(default[0], element)]
        example = type(default[0]).__name__
        return f"expects a list of {example} (element {bad[0]!r} is not)" if bad else None
    if isinstance(default, DictConfig):
        return None if isinstance(value, DictConfig) else "expects a dict, e.g. {a:1}"
    if type(default) not in _TYPE_NAMES:
        return None  # classes, functions and other objects: not checked
    if _fits(default, value) or (value is None and not isinstance(default, bool)):
        return None
    return f"expects {_TYPE_NAMES[type(default)]}"


def _fits(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int subclass
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# --- values of the train node ---------------------------------------------------------------

# (key, smallest value): counts and periods of the train node that must be whole numbers.
_TRAIN_COUNTS = (
    ("train.max_iter", 1),
    ("train.checkpointer.period", 1),
    ("train.eval_period", 0),
    ("train.log_period", 1),
)
# The same for the data: a batch of 0 images would fail deep inside detectron2's loader.
_DATA_COUNTS = (("dataloader.train.total_batch_size", 1),)


def check_train_values(cfg: DictConfig) -> None:
    """The train node's iteration counts and periods are integers in range (0 for eval_period
    means no evaluation during training), and so is dataloader.train.total_batch_size, so a bad
    value is one line before anything starts."""
    for key, smallest in _TRAIN_COUNTS + _DATA_COUNTS:
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        if not _fits(1, value) or value < smallest:
            raise ConfigError(f"{key} must be an integer >= {smallest}, got {value!r}")
