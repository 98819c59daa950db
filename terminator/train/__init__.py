"""Training and evaluation: configuration, offline datasets, the loop, checkpoints, plots.

Needs the ``train`` extra (``pip install -e '.[train]'``: PyYAML, tqdm, matplotlib, mnist1d,
scikit-learn). ``terminator train`` / ``terminator eval`` drive it from the command line.
"""

from .config import TrainConfig, load_config
from .data import DATASETS, DatasetNotFound, load_dataset
from .loop import CheckpointRefused, evaluate_checkpoint, load_checkpoint, train

__all__ = ["TrainConfig", "load_config", "DATASETS", "DatasetNotFound", "load_dataset", "train",
           "evaluate_checkpoint", "load_checkpoint", "CheckpointRefused"]
