"""segany: Segment Anything for scientists and GIS analysts.

The core package: the SAM model family, safe checkpoint loading, the predictor, and (in
later modules) automatic mask generation, tiling, caches, geo I/O, training and evaluation.
No GUI toolkit is imported here.

Example:
    >>> import numpy as np, segany
    >>> predictor = segany.SamPredictor(segany.build_sam("test_tiny"))
    >>> predictor.set_image(np.random.randint(0, 255, (64, 64), np.uint8))
    >>> masks, scores, _ = predictor.predict(box=np.array([8, 8, 40, 40]), multimask_output=False)
    >>> masks.shape
    (1, 64, 64)
"""

from .amg import AutomaticMaskGenerator
from .build import ModelConfig, build_sam, load_model, model_configs, register_config
from .errors import CheckpointError, ImageError, PromptError, SegAnyError
from .modeling import Sam
from .predictor import ImageEmbedding, SamPredictor

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ImageEmbedding",
    "ImageError",
    "ModelConfig",
    "PromptError",
    "Sam",
    "SamPredictor",
    "SegAnyError",
    "__version__",
    "build_sam",
    "load_model",
    "model_configs",
    "register_config",
]
