"""Checkpoints and run files: atomic writes, validated loads, RNG states.

A checkpoint is a dict of tensors and plain data (``torch.load(weights_only=True)``
reads it): format tag, epoch, training and model configuration, model, optimizer and
scheduler states, every rank's RNG states, metric history, best epoch, data statistics.
"""

from __future__ import annotations

import csv
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.terminator import Terminator, TerminatorConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointRefused",
    "save_atomic",
    "write_text_atomic",
    "write_csv_atomic",
    "load_checkpoint",
    "check_resumable",
    "model_from_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "terminator-checkpoint-v1"

# Entries every checkpoint has, with their types; a resumable one also has _TRAINING_ENTRIES.
_ENTRIES = {"epoch": int, "config": dict, "model_config": dict, "model": dict}
_TRAINING_ENTRIES = {"optimizer": dict, "scheduler": dict, "rng": list, "history": list, "best": dict}


class CheckpointRefused(RuntimeError):
    """A file that is not a readable terminator checkpoint; the message is one line naming it."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv_atomic(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Writes ``rows`` (only ``fields``, in that order) as CSV to a temporary file, then renames it."""
    tmp = _temporary(path)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in fields})
    os.replace(tmp, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_entries(ckpt: dict, entries: dict[str, type], path: Path, what: str) -> None:
    for key, kind in entries.items():
        if key not in ckpt:
            raise CheckpointRefused(f"cannot use checkpoint {path}: {what} entry {key!r} is missing")
        if not isinstance(ckpt[key], kind):
            raise CheckpointRefused(
                f"cannot use checkpoint {path}: its {key!r} entry is a {type(ckpt[key]).__name__}, "
                f"not a {kind.__name__}"
            )


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Reads a checkpoint with ``weights_only=True`` and checks it is one of ours.

    Raises :class:`FileNotFoundError` when there is no file, and :class:`CheckpointRefused`
    (one line naming the file and what is wrong) for an empty, truncated, foreign or
    damaged file or one carrying pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointRefused(f"cannot read checkpoint {path}: the file is empty")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a cut one has lost its directory
        raise CheckpointRefused(
            f"cannot read checkpoint {path}: not a complete PyTorch checkpoint "
            "(no zip archive as torch.save writes: truncated, damaged or another format)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointRefused(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain data "
            f"(torch.load(weights_only=True) rejected it: {str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:  # torch.load fails in many ways on a damaged archive
        raise CheckpointRefused(
            f"cannot read checkpoint {path}: damaged PyTorch archive ({_first_line(exc)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointRefused(f"refusing to load {path}: not a terminator training checkpoint")
    _check_entries(ckpt, _ENTRIES, path, "the")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointRefused(f"cannot use checkpoint {path}: its 'model' entry is not a state dict of tensors")
    return ckpt


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """Raises :class:`CheckpointRefused` unless ``ckpt`` holds the state training resumes from."""
    _check_entries(ckpt, _TRAINING_ENTRIES, Path(path), "the training-state")


def model_from_checkpoint(ckpt: dict, path: str | Path) -> Terminator:
    """The checkpoint's network with its weights; a mismatch is a :class:`CheckpointRefused`."""
    try:
        model = Terminator(TerminatorConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointRefused(
            f"cannot use checkpoint {path}: its weights do not fit its model configuration ({_first_line(exc)})"
        ) from None
    return model


def rng_state() -> dict:
    """This process's torch, NumPy, Python (and CUDA) RNG states as tensors and plain data."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
