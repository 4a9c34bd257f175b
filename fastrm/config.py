"""Trainer configs: one dataclass per trainer, loaded from YAML plus ``key=value`` overrides.

OmegaConf does the parsing and type conversion (``lr=abc`` fails naming ``lr``); each dataclass's
``validate()`` then checks ranges, combinations and paths, naming the setting and the value it got, so a run
stops at start and not an hour in. Every field is declared with :func:`setting` (its one-line meaning), from
which ``fastrm <command> --help`` lists every setting (:func:`settings_help`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastrm.errors import ConfigError

T = TypeVar("T")

# model.name_or_path=tiny: the small Llama fastrm builds from scratch for the embedded task (never downloaded). A
# setting's value, read by the layers that load models (models), tokenizers (data) and adapters (lora).
TINY = "tiny"

__all__ = ["ConfigError", "require_setting", "setting", "load_config", "parse_cli", "settings_help",
           "describe_settings"]


def require_setting(condition: bool, setting: str, value, expected: str):
    if not condition:
        raise ConfigError(f"setting {setting}={value!r}: {expected}")


def require_writable_dir(path: str, setting: str = "output_dir"):
    """``path`` is a folder fastrm can create and write into (checked without creating anything)."""
    folder = Path(path).expanduser()
    require_setting(not folder.exists() or folder.is_dir(), setting, path, "is a file, not a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    require_setting(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), setting, path,
            f"cannot write there ({existing} is not a writable folder)")


def require_path(path: str | None, setting: str, what: str = "file or folder"):
    """``path`` (when set) exists."""
    if path is not None:
        require_setting(Path(path).expanduser().exists(), setting, path, f"no such {what}")


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


def _meaning(cls, name: str) -> str | None:
    """A field's meaning: its own, or that of the base class that declared it (a subclass re-declaring a setting
    only to change its default keeps the base's meaning)."""
    for base in cls.__mro__:
        field = getattr(base, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata.get("help"):
            return field.metadata["help"]
    return None


def _type_name(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _show(value) -> str:
    """A default as the user would type it (YAML): null, true/false, plain strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def describe_settings(cls, prefix: str = "") -> list[tuple[str, str, str, str | None]]:
    """``(name, type, default, meaning)`` of every setting of the config dataclass ``cls``, nested dataclasses
    flattened to dotted names (``model.name_or_path``), in declaration order. A default the ``tiny`` preset
    replaces (``cls.TINY_PRESET``) reads ``<default> (tiny: <value>)``."""
    defaults = cls()
    tiny = getattr(cls, "TINY_PRESET", {}) if not prefix else {}
    rows = []
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name)
        if dataclasses.is_dataclass(value):
            rows += describe_settings(type(value), f"{prefix}{field.name}.")
            continue
        default = _show(value)
        if field.name in tiny and tiny[field.name] != value:
            default += f" (tiny: {_show(tiny[field.name])})"
        rows.append((prefix + field.name, _type_name(field.type), default, _meaning(cls, field.name)))
    return rows


def settings_help(cls) -> str:
    """The settings table of ``fastrm <command> --help``, generated from ``cls`` (it cannot drift)."""
    rows = describe_settings(cls)
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"settings of {cls.__name__} (key=value on the command line, or keys of the --config YAML file; "
             "nested ones dotted; (tiny: x) is the tiny preset's value, used with model.name_or_path=tiny):",
             f"  {'name':<{width[0]}}  {'type':<{width[1]}}  {'default':<{width[2]}}  meaning"]
    lines += [f"  {n:<{width[0]}}  {t:<{width[1]}}  {d:<{width[2]}}  {m}" for n, t, d, m in rows]
    return "\n".join(lines)


def load_config(cls: type[T], config_path: str | Path | None = None, overrides=()) -> T:
    """``cls`` defaults, then its preset (``cls.preset_values``, e.g. the ``tiny`` model's settings), then the YAML
    file, then ``key=value`` overrides (dotted keys for nesting): whatever the user sets wins over the preset."""
    import yaml

    user = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            user.append(OmegaConf.load(path))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(user[-1], DictConfig):
            raise ConfigError(f"config file {path} must hold key: value settings, not a list")
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad[0]!r}")
    try:
        user.append(OmegaConf.from_dotlist(list(overrides)))
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
    """The command line of every trainer: ``--config FILE``, ``--resume`` and ``key=value`` overrides, in any
    order (later overrides win; the file comes first) -> a validated ``cls``. ``--help`` lists every setting."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=settings_help(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help=f"YAML file of {cls.__name__} settings (overrides win)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a user error too (also FASTRM_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings (dotted keys for nested ones)")
    args = parser.parse_intermixed_args(argv)
    return load_config(cls, args.config, args.overrides + (["resume=true"] if args.resume else []))
