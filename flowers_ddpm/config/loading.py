"""Loading the training settings: defaults < recipe < YAML file < command-line flags, coerced to their types, then
validated (config/validation.py). Flags are flat (diffusers' names); config/sections.py says which section each
fills."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import UserError
from .recipes import RECIPES, recipe_settings
from .sections import DEFAULT_SAMPLERS, FIELDS, SECTIONS, TrainConfig
from .validation import validate

FINETUNE_LEARNING_RATE = 2e-5  # default LR when fine-tuning all (or --train_only) weights of a pretrained UNet


_TYPES = {name: hint for section in SECTIONS.values() for name, hint in typing.get_type_hints(section).items()}


def setting_type(name: str) -> type:
    """The type of a setting's values (bool, int, float, str, dict, or a list such as list[float]), without
    Optional."""
    tp = _TYPES[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _list_item_type(tp) -> type | None:
    """The item type of a list setting (float for list[float]); None for other settings."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _type_name(tp) -> str:
    item = _list_item_type(tp)
    return f"a list of {item.__name__}" if item is not None else tp.__name__


# Other names of a setting: diffusers' newer example scripts call --logger --report_to.
ALIASES = {"report_to": "logger"}
TRAIN_SECTIONS = tuple(name for name in SECTIONS if name != "classifier")  # train-classifier adds "classifier"


def add_train_arguments(parser: argparse.ArgumentParser, sections: Iterable[str] = TRAIN_SECTIONS,
                        hidden: Iterable[str] = (), exclude: Iterable[str] = (), config_flag: bool = True) -> None:
    """One flag per setting of the given sections, in one argument group per section; the `hidden` sections'
    flags are accepted but left out of --help; `exclude` names settings the command defines itself. Unset flags
    stay absent so YAML values are not overridden."""
    if config_flag:
        parser.add_argument("--config", help="YAML file with any of the settings below (flat names, as the flags)")
    for section in sections:
        group = parser.add_argument_group(f"{section} settings", SECTIONS[section].__doc__)
        for f in dataclasses.fields(SECTIONS[section]):
            if f.metadata["cli"] and f.name not in exclude:
                _add_flag(group, f)
    for section in hidden:
        for f in dataclasses.fields(SECTIONS[section]):
            if f.metadata["cli"]:
                _add_flag(parser, f, shown=False)


def _add_flag(group, f: dataclasses.Field, shown: bool = True) -> None:
    tp = setting_type(f.name)
    names = [f"--{f.name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == f.name]
    help_text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
    common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%") if shown else argparse.SUPPRESS)
    if tp is bool:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
    elif f.metadata["choices"]:
        group.add_argument(*names, type=str, metavar="{" + ",".join(f.metadata["choices"]) + "}", **common)
    elif _list_item_type(tp) is not None:  # `--name V1 V2 ...`; its length is checked with the setting
        group.add_argument(*names, type=str, nargs="+", metavar=_list_item_type(tp).__name__.upper(), **common)
    else:
        group.add_argument(*names, type=str, metavar=tp.__name__.upper(), **common)


def _coerce(name: str, value: Any) -> Any:
    tp = setting_type(name)
    item = _list_item_type(tp)
    if value is None:
        return None
    if item is not None and isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # one word after a list flag (`--name none`): read as the same word in YAML
    if isinstance(value, str) and value.lower() in ("none", "null") and _TYPES[name] != tp:
        return None
    try:
        if item is not None:  # a YAML list, the words of a list flag, or one string of them ("0.5 4", a sweep grid)
            values = value.split() if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)):
                raise ValueError
            return [item(v) for v in values]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {_type_name(tp)}, got {value!r}") from None


def load_yaml(path: str) -> dict:
    """Read a YAML config file into a dict, with a clear error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting: value")
    return data


def build_config(file_values: dict, cli_values: dict) -> TrainConfig:
    """Merge defaults < YAML < CLI, coerce types, and validate."""
    merged: dict[str, Any] = {}
    for source in (file_values, cli_values):
        for key, value in source.items():
            key = ALIASES.get(key, key)
            if key not in FIELDS:
                raise UserError(f"unknown setting {key!r}; see `flowers-ddpm train --help` for the allowed settings")
            merged[key] = _coerce(key, value)
    explicit = frozenset(merged)
    _recipe_defaults(merged)
    _finetune_defaults(merged)
    _objective_defaults(merged, explicit)
    cfg = TrainConfig.from_flat(merged)
    cfg.explicit = explicit
    validate(cfg)
    return cfg


def _recipe_defaults(merged: dict) -> None:
    """Fill the settings the user did not give from the named recipe: defaults < recipe < YAML < flags."""
    if merged.get("recipe") is None:
        return

    if merged["recipe"] not in RECIPES:
        raise UserError(f"recipe must be one of {', '.join(RECIPES)}; got {merged['recipe']!r}")
    model_preset = merged.get("model_preset", FIELDS["model_preset"].default)
    class_conditional = bool(merged.get("class_conditional", FIELDS["class_conditional"].default))
    for key, value in recipe_settings(merged["recipe"], model_preset, class_conditional).items():
        if key == "unet_config":
            # UNet settings of the recipe join the user's own, under them; a UNet config file the user names
            # (--model_config_name_or_path) describes the whole architecture, so the recipe leaves it alone
            if merged.get("model_config_name_or_path") is None:
                merged["unet_config"] = {**value, **(merged.get("unet_config") or {})}
        elif key == "learned_loss_weights" and (merged.get("objective") == "edm" or merged.get("snr_gamma") is not None):
            continue  # the user chose another loss weighting (EDM's or Min-SNR); the recipe's learned one gives way
        else:
            merged.setdefault(key, value)


def _objective_defaults(merged: dict, explicit: frozenset) -> None:
    """EDM models sample with EDM schedulers: the sample grids' default sampler becomes the EDM default."""
    if merged.get("objective") == "edm" and "sample_scheduler" not in explicit:
        merged["sample_scheduler"] = DEFAULT_SAMPLERS["edm"]


def _finetune_defaults(merged: dict) -> None:
    """Full fine-tuning of a pretrained UNet defaults to a lower learning rate than training from scratch."""
    if merged.get("init_from") and merged.get("lora_rank") is None and "learning_rate" not in merged:
        merged["learning_rate"] = FINETUNE_LEARNING_RATE


def parse_train_config(args: argparse.Namespace) -> TrainConfig:
    """Build the config from parsed CLI args (which may name a YAML file with --config)."""
    values = vars(args).copy()
    values.pop("command", None)
    values.pop("func", None)
    config_path = values.pop("config", None)
    file_values = load_yaml(config_path) if config_path else {}
    return build_config(file_values, values)
