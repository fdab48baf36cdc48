"""A persistent cache of tile embeddings (zarr), so a raster is encoded once.

Layout of a cache folder (``scene.vit_b.zarr``), a zarr v3 group:

* ``embeddings``: ``n_tiles x C x g x g`` (``1 x 256 x 64 x 64`` per tile for SAM), one
  chunk per tile, ``float16`` by default (half the disk; the decoder does not notice);
* ``status``: one byte per tile, ``0`` pending, ``1`` encoded, ``2`` empty (all nodata);
* ``valid_fraction``: share of valid pixels per tile;
* attributes: the raster's signature (size, CRS, transform, sampled-pixel hash), the band
  choice and normalisation, the tile grid, the model (configuration, weights fingerprint,
  checkpoint file) and the segany version.

**Atomic per tile.** A tile's embedding chunk is written first and its ``status`` byte
last; a tile counts as encoded only once that byte is 1. A run killed mid-write leaves the
tile pending, and the next run recomputes exactly the pending tiles (zarr itself writes
each chunk through a temporary file).

**Mismatch.** Opening a cache for a different raster, band choice, normalisation, grid,
model or storage type either recomputes it (``on_mismatch="recompute"``, after deleting
the old folder, only if it is a segany cache) or raises :class:`CacheMismatchError`
listing every difference.

Example:
    >>> import numpy as np, segany
    >>> from segany.raster import open_raster, write_test_raster, tmp_dir
    >>> from segany.tiling import TileGrid
    >>> raster = open_raster(write_test_raster(tmp_dir() / "c.tif", np.zeros((1, 64, 64), "uint8") + 9))
    >>> grid = TileGrid(64, 64, tile_size=64, overlap=0)
    >>> cache = EmbeddingCache.create(tmp_dir() / "c.zarr", raster=raster, grid=grid, model=segany.build_sam("test_tiny"))
    >>> cache.pending()
    [0]
    >>> cache.write(0, np.ones((256, 64, 64), np.float32), 1.0)
    >>> cache.pending(), cache.complete, tuple(cache.read(0).features.shape)
    ([], True, (1, 256, 64, 64))
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import SegAnyError

if TYPE_CHECKING:  # pragma: no cover
    from .modeling import Sam
    from .predictor import ImageEmbedding
    from .raster import Raster
    from .tiling import TileGrid

__all__ = ["CACHE_FORMAT", "CacheError", "CacheMismatchError", "EmbeddingCache", "cache_attributes"]

#: Bumped when the layout or the meaning of the stored embeddings changes.
CACHE_FORMAT = 1
PENDING, DONE, EMPTY = 0, 1, 2


class CacheError(SegAnyError):
    """An embedding cache cannot be used (not a cache, incomplete, unreadable)."""


class CacheMismatchError(CacheError):
    """The cache was made for another raster, band choice, normalisation, grid or model."""


def _minor_version(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def cache_attributes(raster: "Raster", grid: "TileGrid", model: "Sam", dtype: str) -> dict[str, Any]:
    """Everything the stored embeddings depend on, as JSON-able attributes."""
    from . import __version__
    from .tiling import model_fingerprint

    checkpoint = getattr(model, "checkpoint_path", None)
    return {
        "segany_cache": CACHE_FORMAT,
        "segany_version": __version__,
        **_raster_attributes(raster),
        "grid": grid.to_dict(),
        "model": {
            "type": getattr(model, "model_type", None),
            "image_size": int(model.image_encoder.img_size),
            "weights": model_fingerprint(model),
            "checkpoint": os.path.basename(checkpoint) if checkpoint else None,
        },
        "dtype": dtype,
    }


def _raster_attributes(raster: "Raster") -> dict[str, Any]:
    return {
        "source": str(raster.path),
        "raster": raster.signature(),
        "bands": list(raster.bands),
        "normalisation": {
            "value_range": None if raster.value_range is None else list(raster.value_range),
            "percentiles": list(raster.percentiles),
            "nodata": raster.user_nodata,
        },
    }


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences that make stored embeddings wrong for ``wanted``."""
    import json

    def same(a: Any, b: Any) -> bool:
        # JSON round trip: tuples vs lists and int vs float compare like the stored attributes.
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))

    out = []
    if stored.get("segany_cache") != wanted["segany_cache"]:
        out.append(f"cache format {stored.get('segany_cache')} (this segany writes {wanted['segany_cache']})")
    if _minor_version(stored.get("segany_version", "")) != _minor_version(wanted["segany_version"]):
        out.append(f"made by segany {stored.get('segany_version')} (this is {wanted['segany_version']})")
    s_r, w_r = stored.get("raster", {}), wanted["raster"]
    if not same(s_r, w_r):
        keys = [k for k in w_r if not same(s_r.get(k), w_r[k])]
        out.append("a different raster (" + ", ".join(keys) + " differ)")
    for key, label in (("bands", "bands"), ("normalisation", "normalisation"), ("grid", "tile grid"),
                       ("dtype", "storage type")):
        if not same(stored.get(key), wanted[key]):
            out.append(f"{label} {stored.get(key)} (now {wanted[key]})")
    s_m, w_m = stored.get("model", {}), wanted["model"]
    for key in ("type", "image_size", "weights"):
        if s_m.get(key) != w_m[key]:
            what = "model weights" if key == "weights" else f"model {key}"
            out.append(f"{what} {s_m.get(key)} (now {w_m[key]})")
    return out


class EmbeddingCache:
    """Tile embeddings of one raster for one model; see the module docs for the layout.

    Build one with :meth:`create` (new or matching existing cache) or :meth:`open`.
    """

    def __init__(self, group: Any, path: Path | None) -> None:
        from .tiling import TileGrid

        self.group = group
        self.path = path
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.grid = TileGrid(**self.attrs["grid"])
        self._emb = group["embeddings"]
        self._status = group["status"]
        self._valid = group["valid_fraction"]

    # -------------------------------------------------------------- opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        raster: "Raster",
        grid: "TileGrid",
        model: "Sam",
        dtype: str = "float16",
        on_mismatch: str = "recompute",
    ) -> "EmbeddingCache":
        """Open the cache at ``path`` if it matches, else create it (None: in memory).

        Args:
            on_mismatch: ``"recompute"`` (delete and start again) or ``"error"``.
        """
        if on_mismatch not in ("recompute", "error"):
            raise SegAnyError(f"on_mismatch must be 'recompute' or 'error', got {on_mismatch!r}")
        if dtype not in ("float16", "float32"):
            raise SegAnyError(f"cache dtype must be 'float16' or 'float32', got {dtype!r}")
        wanted = cache_attributes(raster, grid, model, dtype)
        if path is None:
            import zarr

            group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
            cls._initialise(group, wanted, model)
            return cls(group, None)
        path = Path(path)
        if path.is_dir() and not any(path.iterdir()):
            # An empty folder is a place to put the cache, not a cache (GUIs that ask for an
            # output folder create it before the work starts).
            path.rmdir()
        if path.exists():
            existing = cls.open(path)
            problems = _differences(existing.attrs, wanted)
            if not problems:
                return existing
            message = f"embedding cache {path} does not fit: it was made for " + "; ".join(problems)
            if on_mismatch == "error":
                raise CacheMismatchError(message + ". Delete it, choose another path, or recompute it.")
            import warnings

            warnings.warn(message + "; recomputing it", stacklevel=2)
            shutil.rmtree(path)
        return cls._create_new(path, wanted, model)

    @classmethod
    def _create_new(cls, path: Path, attrs: dict[str, Any], model: "Sam") -> "EmbeddingCache":
        import zarr

        path.parent.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed into place: a cache folder either is complete metadata or
        # does not exist, even if the process dies while creating it.
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            group = zarr.open_group(str(tmp), mode="w")
            cls._initialise(group, attrs, model)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path)

    @staticmethod
    def _initialise(group: Any, attrs: dict[str, Any], model: "Sam") -> None:
        from .tiling import TileGrid

        n = len(TileGrid(**attrs["grid"]))
        channels = int(model.prompt_encoder.embed_dim)
        gh, gw = (int(v) for v in model.prompt_encoder.image_embedding_size)
        # Uncompressed: half-precision features hardly compress (~8 %), and zstd would double
        # the cost of writing a tile.
        group.create_array("embeddings", shape=(n, channels, gh, gw), chunks=(1, channels, gh, gw),
                           dtype=attrs["dtype"], fill_value=0, compressors=None)
        group.create_array("status", shape=(n,), chunks=(1,), dtype="uint8", fill_value=PENDING)
        group.create_array("valid_fraction", shape=(n,), chunks=(1,), dtype="float32", fill_value=0)
        group.attrs.update(attrs)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r+") -> "EmbeddingCache":
        """Open an existing cache folder (no check against a raster or model).

        Example:
            >>> try:
            ...     EmbeddingCache.open("/nonexistent/x.zarr")
            ... except CacheError as exc:
            ...     print(exc)
            embedding cache /nonexistent/x.zarr does not exist
        """
        import zarr

        path = Path(path)
        if not path.exists():
            raise CacheError(f"embedding cache {path} does not exist")
        try:
            group = zarr.open_group(str(path), mode=mode)
            attrs = dict(group.attrs)
        except Exception as exc:  # zarr raises several types for "not a group"
            raise CacheError(f"{path} is not a readable zarr embedding cache ({exc})") from None
        if "segany_cache" not in attrs or not all(k in group for k in ("embeddings", "status", "valid_fraction")):
            raise CacheError(f"{path} is a zarr folder but not a segany embedding cache")
        return cls(group, path)

    def verify(self, raster: "Raster", model: "Sam | None" = None) -> None:
        """Raise :class:`CacheMismatchError` unless this cache holds embeddings of ``raster``
        (same pixels, bands and normalisation) made by ``model`` (same weights)."""
        if model is not None:
            wanted = cache_attributes(raster, self.grid, model, self.attrs["dtype"])
        else:  # no model to compare: the raster part only
            wanted = dict(self.attrs, **_raster_attributes(raster))
        problems = [p for p in _differences(self.attrs, wanted) if not p.startswith("tile grid")]
        if problems:
            raise CacheMismatchError(
                f"embedding cache {self.path or 'in memory'} was made for " + "; ".join(problems)
                + f", not for {raster.path.name} with this model; recompute it (segany embed)"
            )

    def raster_for(self, raster: "Raster") -> "Raster":
        """``raster`` as this cache saw it: itself, or the extent of it that was encoded
        (a :meth:`~segany.raster.Raster.subset`, recognised from the size and geotransform
        the cache records). Check the result with :meth:`verify`.

        Example:
            >>> import numpy as np, segany
            >>> from segany.raster import Window, open_raster, write_test_raster, tmp_dir
            >>> from segany.tiling import TileGrid
            >>> r = open_raster(write_test_raster(tmp_dir() / "e.tif", np.arange(64 * 64, dtype="uint16").reshape(1, 64, 64)))
            >>> part = r.subset(Window(8, 16, 32, 40))
            >>> cache = EmbeddingCache.create(None, raster=part, grid=TileGrid(32, 40, 32, 0), model=segany.build_sam("test_tiny"))
            >>> again = cache.raster_for(r)
            >>> (again.height, again.width, again.parent_window)
            (32, 40, Window(row0=8, col0=16, height=32, width=40))
        """
        from .raster import Window

        stored = self.attrs.get("raster", {})
        width, height = stored.get("width"), stored.get("height")
        transform = stored.get("transform")
        if (width, height) == (raster.width, raster.height) or transform is None or width is None:
            return raster
        a, b, c, d, e, f = (float(v) for v in tuple(raster.transform)[:6])
        if b or d or not a or not e:
            return raster  # rotated rasters: no subset arithmetic; verify() will explain
        col0, row0 = (float(transform[2]) - c) / a, (float(transform[5]) - f) / e
        if abs(col0 - round(col0)) > 1e-6 or abs(row0 - round(row0)) > 1e-6:
            return raster
        window = Window(int(round(row0)), int(round(col0)), int(height), int(width))
        if window.row0 < 0 or window.col0 < 0 or window.row1 > raster.height or window.col1 > raster.width:
            return raster
        return raster.subset(window)

    # -------------------------------------------------------------- state
    def __len__(self) -> int:
        return len(self.grid)

    def __repr__(self) -> str:
        done = int((self.statuses() != PENDING).sum())
        where = str(self.path) if self.path else "memory"
        return f"EmbeddingCache({where!r}, {done}/{len(self)} tiles, model {self.model_type!r})"

    @property
    def model_type(self) -> str | None:
        return self.attrs["model"]["type"]

    def statuses(self) -> np.ndarray:
        """Status byte of every tile (0 pending, 1 encoded, 2 empty)."""
        return np.asarray(self._status[:])

    def pending(self) -> list[int]:
        """Indices of tiles still to encode."""
        return [int(i) for i in np.flatnonzero(self.statuses() == PENDING)]

    @property
    def complete(self) -> bool:
        return not self.pending()

    def status(self, index: int) -> int:
        return int(self._status[index])

    def valid_fraction(self, index: int) -> float:
        return float(self._valid[index])

    # -------------------------------------------------------------- tiles
    def write(self, index: int, features: Any, valid_fraction: float = 1.0) -> None:
        """Store one tile's ``C x g x g`` (or ``1 x C x g x g``) embedding, then commit it."""
        array = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
        array = array.reshape(self._emb.shape[1:])
        self._emb[index] = array.astype(self._emb.dtype)
        self._valid[index] = valid_fraction
        self._status[index] = DONE  # last: the commit of this tile

    def mark_empty(self, index: int) -> None:
        """Record a tile without valid pixels (nothing to encode or segment there)."""
        self._valid[index] = 0.0
        self._status[index] = EMPTY

    def read(self, index: int) -> "ImageEmbedding":
        """The embedding of tile ``index``, ready for ``SamPredictor.set_embedding``."""
        import torch

        from .predictor import ImageEmbedding
        from .transforms import preprocess_shape

        status = self.status(index)
        if status != DONE:
            what = "has no valid pixels" if status == EMPTY else "is not encoded yet"
            raise CacheError(f"tile {index} of embedding cache {self.path or 'in memory'} {what}")
        window = self.grid[index].window
        features = torch.from_numpy(np.asarray(self._emb[index], dtype=np.float32))[None]
        size = int(self.attrs["model"]["image_size"])
        return ImageEmbedding(features, window.shape, preprocess_shape(window.height, window.width, size),
                              self.model_type)
