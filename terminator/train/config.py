"""A run's configuration: :class:`TrainConfig`, read from YAML with command-line overrides."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "apply_overrides", "parse_set", "default_cache_dir"]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("TERMINATOR_DATA_CACHE") or os.path.join(base, "terminator-hyperzzw", "data")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``config.yaml`` in the run directory).

    ``model`` holds :class:`terminator.models.TerminatorConfig` fields that replace the
    preset's (``size`` and ``num_classes`` always come from the data). ``batch_size`` is
    the global batch: with N processes each takes ``batch_size // N``.
    """

    # data
    dataset: str = "mnist1d"  # mnist1d | fashion-mnist | fashion-mnist-seq | fashion-mnist-pseq | digits
    data_dir: str | None = None  # fashion-mnist idx .gz folder (default /usr/share/datasets/fashion-mnist)
    cache_dir: str | None = None  # generated data (mnist1d); default ~/.cache/terminator-hyperzzw/data
    val_fraction: float = 0.1  # held out of the training split (0: no validation set)
    pseq_seed: int = 0  # the fixed pixel permutation of fashion-mnist-pseq
    augment: bool = False  # 2D only: random shifts of up to `shift` pixels (zero padding)
    shift: int = 2
    flip: bool = False  # 2D only, with augment: random horizontal flips
    limit_train: int | None = None  # use only the first N training samples (smoke runs)
    limit_test: int | None = None
    # model
    preset: str | None = None  # None: the dataset's default preset
    model: dict[str, Any] = field(default_factory=dict)
    # optimization
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 500
    optimizer: str = "kar3"  # kar3 | kar2 | adam (torch.optim.Adam, no weight decay)
    lr: float = 1.215e-3
    betas: tuple[float, float] | None = None  # None: (0.5, 0.95) for kar3/kar2, (0.9, 0.999) for adam
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.09
    l2: float = 5e-5
    slow_weight: float = 1.0
    # run
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the training step (cold: a minute or more; inductor caches it on disk)
    out: str | None = None  # run directory (default runs/<dataset>-<preset>)
    progress: bool = True  # tqdm progress bar (rank 0)
    plots: bool = True  # PNG learning curves and global hyper-kernels
    checkpoint_every: int = 1  # epochs between last.pt writes
    stop_after: int | None = None  # stop after N more epochs (the schedule still spans `epochs`)
    track_test: bool = False  # also log test accuracy each epoch (time-to-accuracy curves; never used to select)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # A number a Python caller passes as text, e.g. lr="2e-3".
            if f.type in ("float", "float | None") and isinstance(value, (str, int)) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
        if self.optimizer not in ("kar3", "kar2", "adam"):
            raise ValueError(f"optimizer must be 'kar3', 'kar2' or 'adam', got {self.optimizer!r}")
        if self.betas is None:
            self.betas = (0.9, 0.999) if self.optimizer == "adam" else (0.5, 0.95)
        self.betas = tuple(float(b) for b in self.betas)
        self.model = dict(self.model or {})
        if self.epochs < 0 or self.batch_size < 1 or not 0 <= self.val_fraction < 1:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and 0 <= val_fraction < 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and primitives (YAML, JSON and ``torch.load(weights_only=True)``)."""

        def plain(v):
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known: {sorted(names)}")
        return cls(**data)


@functools.cache
def _yaml_loader():
    """PyYAML's safe loader, reading ``2e-3`` as the number YAML 1.2 says it is (1.1: a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_float = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_float, list("-+0123456789"))
    return Loader


def _yaml_load(stream: Any) -> Any:
    import yaml

    return yaml.load(stream, Loader=_yaml_loader())


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["a=1", "model.channels=[1,4]"]`` → nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parsed = _yaml_load(value) if value.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed
    return out


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merges ``overrides`` into a copy of ``base`` (nested dicts merge, the rest replaces)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = apply_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults ← ``base`` (e.g. a checkpoint's config) ← YAML file ← ``overrides``."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        with open(path, encoding="utf-8") as f:
            loaded = _yaml_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of configuration keys")
        data = apply_overrides(data, loaded)
    data = apply_overrides(data, overrides or {})
    return TrainConfig.from_dict(data)
