"""The trainer state of a checkpoint, stored without pickle: safetensors for its tensors, JSON for the rest; an
older fastrm's pickled state read with ``weights_only`` and the caller's config classes only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import torch

from fastrm.checkpoint.files import CheckpointLoadError, read_json

STATE_JSON = "trainer_state.json"


STATE_TENSORS = "trainer_state.safetensors"


LEGACY_STATE = "trainer_state.pt"  # pickled state of fastrm before the JSON format; loaded weights_only


STATE_FORMAT = 1


def encode_state(obj, tensors: dict, storages: set, path: str):
    """JSON-able form of ``obj``; tensors go to ``tensors`` and are referenced by key. Tuples and non-string keys
    are tagged so that the state round-trips exactly (``random.setstate`` needs its tuples)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
        if storage.data_ptr() in storages or not whole:
            t = t.clone()  # safetensors stores whole, unshared storages
        storages.add(t.untyped_storage().data_ptr())
        key = path
        while key in tensors:
            key += "'"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, storages, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, storages, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, storages, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, storages, f"{path}/key{i}"),
                               encode_state(v, tensors, storages, f"{path}/{i}")] for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"trainer state: cannot store a {type(obj).__name__} (at {path or '/'}) without pickle; "
                    f"convert it to tensors, numbers, strings, lists or dicts")


def decode_state(obj, tensors: dict):
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(decode_state(v, tensors) for v in value)
            if tag == "__items__":
                return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def write_state(folder: Path, state: dict):
    """``state`` as ``trainer_state.json`` (everything but tensors) + ``trainer_state.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict = {}
    encoded = encode_state(state, tensors, set(), "")
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    with open(Path(folder) / STATE_JSON, "w") as f:
        json.dump(encoded, f)


def read_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    with open(Path(folder) / STATE_JSON) as f:
        encoded = json.load(f)
    return decode_state(encoded, load_file(str(Path(folder) / STATE_TENSORS)))


def dataclass_types(config) -> list[type]:
    """``config``'s class and the classes of the dataclasses inside it (``model``, ``lora``, ...): what a trainer
    allows an older fastrm's pickled state to hold (:func:`load_trainer_state`)."""
    types = [type(config)]
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            types += [t for t in dataclass_types(value) if t not in types]
    return types


def load_trainer_state(checkpoint: Path, allowed: Sequence[type] = ()) -> dict:
    """A checkpoint's trainer state, read without executing anything: the JSON + safetensors format, or an older
    fastrm's ``trainer_state.pt`` through ``torch.load(weights_only=True)`` (tensors, numbers and the config
    dataclasses ``allowed``: the caller's, see :func:`dataclass_types`). ``state["config"]`` is a plain dict in both
    cases."""
    checkpoint = Path(checkpoint)
    if (checkpoint / STATE_JSON).is_file():
        return read_state(checkpoint)
    legacy = checkpoint / LEGACY_STATE
    if not legacy.is_file():
        raise CheckpointLoadError(f"{checkpoint} holds no trainer state ({STATE_JSON})")
    allowed = list(allowed)
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(allowed):
                state = torch.load(legacy, map_location="cpu", weights_only=True)
        else:  # torch < 2.5
            torch.serialization.add_safe_globals(allowed)
            state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling failure means the same thing here)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointLoadError(
            f"{legacy}: refusing to load this pickled trainer state: it holds more than tensors, numbers and "
            f"fastrm's configs (torch.load(weights_only=True) says: {first}). fastrm never runs code from an output "
            f"folder; a state written by fastrm loads this way") from None
    if is_dataclass(state.get("config")):
        state["config"] = asdict(state["config"])
    return state


def saved_settings(checkpoint: Path, allowed: Sequence[type] = ()) -> dict:
    """``{"config": the settings the checkpoint was written with, "world_size": its number of processes or None}``,
    without reading its tensors."""
    path = Path(checkpoint) / STATE_JSON
    if path.is_file():
        raw = read_json(path) or {}
        return {"config": decode_state(raw.get("config") or {}, {}), "world_size": raw.get("world_size")}
    return {"config": load_trainer_state(checkpoint, allowed).get("config") or {}, "world_size": None}
