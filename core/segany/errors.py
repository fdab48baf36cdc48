"""Exceptions raised by segany for problems a user can fix.

Every error names the thing that is wrong (a file, an argument, a shape) so that the
message alone tells the user what to change, without a traceback from inside torch.
"""

from __future__ import annotations


class SegAnyError(ValueError):
    """Base class of segany's user-facing errors.

    It subclasses ``ValueError`` so that callers that already catch ``ValueError`` for bad
    input keep working.
    """


class CheckpointError(SegAnyError):
    """A checkpoint file is missing, truncated, not a checkpoint, or for another model."""


class ImageError(SegAnyError):
    """An image cannot be used as model input (shape, dtype, empty, all-NaN ...)."""


class PromptError(SegAnyError):
    """A prompt (points, labels, box, mask) is malformed or lies outside the image."""
