"""What a collaborator's model directory must hold before an engine loads it.

vLLM reads a model's files deep inside its engine start (the HF config while it builds the
engine config, the weights in the worker), and a missing, truncated or corrupt file then
surfaces as a traceback from ``transformers`` or ``safetensors`` far from the CoS file that
named the directory.  :func:`model_dir_problem` reads only what is cheap (``config.json``, the
safetensors headers and their sizes, the tokenizer's JSON files) and returns one sentence that
names the file, or None.  Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def _json_problem(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{path} is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return f"{path} must hold a JSON object, got {type(value).__name__}"
    return None


def _config_problem(directory: Path) -> str | None:
    path = directory / CONFIG
    if not path.is_file():
        return f"{path} is missing (every model directory needs its HF config)"
    problem = _json_problem(path)
    if problem is None and "model_type" not in json.loads(path.read_text()):
        return f"{path} has no 'model_type' (not a Hugging Face model config)"
    return problem


def safetensors_problem(path: Path) -> str | None:
    """A truncated or corrupt safetensors file (header length, JSON header, data size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes: no safetensors header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                return f"{path} is corrupt or truncated (its header claims {header_len} bytes, the file has {size})"
            header = json.loads(f.read(header_len))
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return f"{path} is corrupt (its safetensors header is not valid JSON)"
    if not isinstance(header, dict):
        return f"{path} is corrupt (its safetensors header is not a JSON object)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path} is corrupt (a tensor entry of its header has no data_offsets)"
    if 8 + header_len + end > size:
        return f"{path} is truncated ({size} bytes; its header describes {8 + header_len + end})"
    return None


def _weights_problem(directory: Path) -> str | None:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        problem = _json_problem(index)
        if problem is not None:
            return problem
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            return f"{directory / missing[0]} is missing (listed in {index})"
        files = [directory / s for s in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any((directory / name).is_file() for name in OTHER_WEIGHTS):
            return None  # a PyTorch checkpoint: vLLM reads it itself
        return f"{directory} has no weights (no *.safetensors or pytorch_model.bin)"
    return next((p for p in map(safetensors_problem, files) if p is not None), None)


def _tokenizer_problem(directory: Path) -> str | None:
    for name in TOKENIZER_JSON:
        path = directory / name
        if path.is_file():
            problem = _json_problem(path)
            if problem is not None:
                return problem
    return None


def model_dir_problem(directory: str | Path) -> str | None:
    """One sentence naming the first unusable file of a model directory, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is not a directory"
    return _config_problem(directory) or _weights_problem(directory) or _tokenizer_problem(directory)
