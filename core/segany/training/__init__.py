"""Training and fine-tuning of SAM models (issue #4).

The modules, one concept each:

* :mod:`.config` -- :class:`TrainConfig`, loaded from YAML (:func:`load_config`);
* :mod:`.data` -- labelled-image sources (folders, COCO via :mod:`segany.datasets`,
  GeoTIFF + vectors rasterised per tile, synthetic scenes, tiles of large images), checks
  that report bad files one by one, augmentation, object sampling;
* :mod:`.prompts` -- the SAM paper's interactive prompt simulation;
* :mod:`.losses` -- focal + dice (20:1) and IoU-MSE, best-of-multimask;
* :mod:`.checkpointing` -- official-layout weights, atomic resume files;
* :mod:`.validation` -- single-point and N-click mIoU;
* :mod:`.trainer` -- the loop (:class:`Trainer`, :func:`train`).

Command line: ``segany train --config run.yaml [--resume]``; the data engine
(:mod:`segany.data_engine`): ``segany pseudo-label``, ``segany engine-round``.

Example:
    >>> from segany.training import TrainConfig, train
    >>> TrainConfig().rounds
    11
"""

from .checkpointing import load_trained_model, save_model
from .config import DataSource, TrainConfig, load_config
from .data import GeoTiles, ImageLabelFolder, LabelledImages, SyntheticScenes, Tiles
from .trainer import Trainer, TrainResult, train

__all__ = [
    "DataSource",
    "GeoTiles",
    "ImageLabelFolder",
    "LabelledImages",
    "SyntheticScenes",
    "TrainConfig",
    "TrainResult",
    "Tiles",
    "Trainer",
    "load_config",
    "load_trained_model",
    "save_model",
    "train",
]
