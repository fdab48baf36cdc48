"""napari reader for segany embedding caches (``*.zarr`` folders made by segany's tiling).

Opening a cache shows the raster it was made from (read lazily, with the cache's band
choice and contrast, i.e. exactly the pixels that were encoded) and tags the layer so that
the "Segment Anything" widget decodes clicks from the cached tile embeddings: no encoder
run at all, even for a raster far larger than memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from segany.interactive import CachedRaster

LayerData = list[tuple[Any, dict[str, Any], str]]


def _single(path: str | list[str]) -> str | None:
    if isinstance(path, (list, tuple)):
        return path[0] if len(path) == 1 else None
    return path


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], LayerData] | None:
    """napari's reader hook: a reader for segany caches, None for anything else."""
    single = _single(path)
    if single is None or not CachedRaster.is_cache(single):
        return None
    return read_embedding_cache


def read_embedding_cache(path: str | list[str]) -> LayerData:
    """The cached raster as an RGB image layer that remembers its cache."""
    single = _single(path)
    assert single is not None
    cached = CachedRaster(single)
    name = f"{Path(cached.source).name} (segany cache)"
    meta = {"segany_cache": str(Path(single).resolve()), "source": cached.source,
            "model_type": cached.model_type}
    return [(cached.image, {"name": name, "rgb": True, "metadata": meta}, "image")]
