"""Training and evaluation: configuration, offline datasets, the loop, checkpoints, plots.

Needs the ``train`` extra (``pip install -e '.[train]'``: PyYAML, tqdm, matplotlib, mnist1d,
scikit-learn). ``terminator train`` / ``terminator eval`` drive it from the command line.

    config.py       TrainConfig (YAML + command-line overrides)
    data.py         the offline datasets and augmentation
    loop.py         train(): setup, resume, the epoch loop, best/last checkpoints
    run.py          a run's state and its directory: metrics.csv, checkpoint contents, results.json
    checkpoint.py   atomic writes, validated checkpoint loads, RNG states
    distributed.py  single process or a DDP rank under torchrun
    allocator.py    glibc keeps freed tensor memory for the next step
    evaluation.py   accuracy, loss and confusion matrix of a model or a checkpoint
    plots.py        learning curves, hyper-kernels, scores
"""

from .checkpoint import CheckpointRefused, load_checkpoint
from .config import TrainConfig, load_config
from .data import DATASETS, DatasetNotFound, load_dataset
from .evaluation import evaluate_checkpoint
from .loop import train

__all__ = [
    "TrainConfig",
    "load_config",
    "DATASETS",
    "DatasetNotFound",
    "load_dataset",
    "train",
    "evaluate_checkpoint",
    "load_checkpoint",
    "CheckpointRefused",
]
