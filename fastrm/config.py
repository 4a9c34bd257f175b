"""Trainer configs: one dataclass per trainer, loaded from YAML plus ``key=value`` overrides.

OmegaConf does the parsing and type conversion (``lr=abc`` fails naming ``lr``); each dataclass's
``validate()`` then checks ranges and combinations, naming the setting and the value it got.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a wrong name, type or value."""


def require(condition: bool, setting: str, value, expected: str):
    if not condition:
        raise ConfigError(f"setting {setting}={value!r}: {expected}")


def setting(default, meaning: str):
    """A config field with its one-line meaning (``fastrm <command> --help`` prints it):
    ``lr: float = setting(1e-4, "peak learning rate")``. A mutable default (a nested config, a list) is
    copied for every instance."""
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        import copy

        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": meaning})
    return dataclasses.field(default=default, metadata={"help": meaning})


def unyaml_no(value):
    """``no`` as its user meant it: YAML 1.1 (OmegaConf) reads ``mixed_precision=no`` as the boolean false, which
    a string setting then receives as ``"False"``."""
    return "no" if value in ("False", False) else value


def load_config(cls: type[T], config_path: str | Path | None = None, overrides=()) -> T:
    """``cls`` defaults, then its preset (``cls.preset_values``, e.g. the ``tiny`` model's settings), then the YAML
    file, then ``key=value`` overrides (dotted keys for nesting): whatever the user sets wins over the preset."""
    user = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        user.append(OmegaConf.load(path))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad[0]!r}")
    user.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        defaults = OmegaConf.structured(cls)
        merged = OmegaConf.merge(defaults, *user)
        preset = cls.preset_values(merged) if hasattr(cls, "preset_values") else {}
        if preset:  # the preset chosen by the merged settings goes under the user's layers
            merged = OmegaConf.merge(defaults, OmegaConf.create(preset), *user)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"{cls.__name__}: setting {key!r}: {first_line}" if key else f"{cls.__name__}: {first_line}") from None
    if hasattr(config, "validate"):
        config.validate()
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | Path):
    OmegaConf.save(OmegaConf.structured(config), Path(path))


def parse_cli(cls: type[T], argv, prog: str, description: str) -> T:
    """``--config FILE``, ``--resume`` and ``key=value`` overrides -> a validated ``cls``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"YAML file with {cls.__name__} settings")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="key=value settings (dotted keys for nested ones)")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides + (["resume=true"] if args.resume else []))
