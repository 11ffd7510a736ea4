"""Reading the files dsrun did not just write: checkpoints, the `latest` pointer, RNG states, snapshots, JSON and
YAML beside weights. A damaged file (truncated, garbage, unreadable, a folder where a file belongs) becomes one
`UserError` naming the file and the fix, never a traceback from a parser deep in a library.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

from dsrun.errors import UserError

# what torch.load, zipfile and pickle raise on a damaged file (a truncated zip, garbage bytes, a wrong format)
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError,
               pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError)


def reason(exc: BaseException) -> str:
    """The first line of what went wrong, short enough for a one-line error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return (text[:200] or type(exc).__name__)


def read_text(path: Path, fix: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({reason(exc)}); {fix}") from None


def read_json(path: Path, fix: str) -> Any:
    text = read_text(path, fix)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path}: damaged, not JSON ({reason(exc)}); {fix}") from None


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    data = read_json(path, fix)
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged, a JSON {type(data).__name__} where an object belongs; {fix}")
    return data


def read_yaml_mapping(path: Path, fix: str) -> dict[str, Any]:
    import yaml

    text = read_text(path, fix)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: damaged, not YAML ({reason(exc)}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged, not a YAML mapping; {fix}")
    return data


def torch_load(path: Path, fix: str) -> Any:
    """`torch.load(weights_only=True)`: no code from the file runs; damage is a user error."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except LOAD_ERRORS as exc:
        raise UserError(f"{path}: damaged or unreadable ({reason(exc)}); {fix}") from None


def check_safetensors(folder: Path) -> None:
    """Every *.safetensors file in `folder` has a readable header and as many bytes as the header promises (a
    truncated download or copy fails here, before a model is built)."""
    import struct

    for path in sorted(Path(folder).glob("*.safetensors")):
        fix = "copy or download the weights again"
        try:
            with path.open("rb") as handle:
                size = path.stat().st_size
                header_len = struct.unpack("<Q", handle.read(8))[0] if size >= 8 else None
                if header_len is None or header_len > size - 8:
                    raise UserError(f"{path}: damaged safetensors file (its header is cut or garbage); {fix}")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: damaged safetensors file ({reason(exc)}); {fix}") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: damaged safetensors file (its header is not a JSON object); {fix}")
        ends = [entry["data_offsets"][1] for key, entry in header.items()
                if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
        if ends and max(ends) > size - 8 - header_len:
            raise UserError(f"{path}: truncated safetensors file ({size:,} bytes, its header describes "
                            f"{8 + header_len + max(ends or [0]):,}); {fix}")
