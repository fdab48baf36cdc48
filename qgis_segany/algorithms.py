"""The Processing algorithms of the ``segany`` provider.

Each algorithm reads its parameters, converts QGIS objects to core objects
(:mod:`qgis_segany.conversions`), calls one ``segany`` core function and writes what it
returns through a feature sink. They run in QGIS's worker threads (no ``FlagNoThreading``:
layers are only read through thread-safe feature sources and file paths), report progress,
stop when cancelled (the core's ``cancel`` hooks poll ``feedback.isCanceled``), and turn
every core error into a :class:`QgsProcessingException` that names the layer or file.

Cancelling keeps what is finished: an encode leaves the tiles written so far in the cache
(the next run resumes), prompts and automatic mode keep the objects already written.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from qgis.core import (
    QgsFeatureRequest,
    QgsFeatureSink,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBand,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterDistance,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
)

from . import conversions
from .environment import missing_message

#: The model choices: segany's default, then the registry's checkpoints.
DEFAULT_MODEL = "default"
#: Shown when the registry cannot be read (segany missing): the algorithms still load.
_FALLBACK_MODELS = ["sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam", "vit_b_lm", "vit_b_em_organelles"]
DEVICES = ["auto", "cpu", "cuda"]


def model_names() -> list[str]:
    """``default`` and the registry names, in the registry's order."""
    try:
        from segany.checkpoints import REGISTRY

        return [DEFAULT_MODEL, *REGISTRY]
    except ImportError:
        return [DEFAULT_MODEL, *_FALLBACK_MODELS]


class ModelCache:
    """The last model loaded, kept for the next run: loading a checkpoint takes seconds
    (vit_h: 2.5 GB). The provider owns one (shared by its algorithms and the map tool of
    the same plugin), so there is no module-level state. Models are read-only in inference,
    so algorithms running at the same time may share one; each run gets its own predictor
    (which holds per-image state) around it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[tuple[Any, ...], Any] | None = None

    def get(self, spec: str | None, device: str | None) -> Any:
        """The model for ``spec`` (a registry name, a checkpoint path or None for the
        default, which honours ``$SEGANY_MODEL``), keyed by the file's identity."""
        from segany.tiling import default_model_spec, resolve_model

        effective = spec if spec is not None else default_model_spec()
        stamp = None
        if effective is not None and os.path.isfile(effective):
            st = os.stat(effective)
            stamp = (os.path.abspath(effective), st.st_size, st.st_mtime_ns)
        key = (effective, stamp, device)
        with self._lock:
            if self._entry is None or self._entry[0] != key:
                self._entry = (key, resolve_model(effective, device=device))
            return self._entry[1]


@contextmanager
def core_errors(what: str, subject: str | None = None) -> Iterator[None]:
    """segany's errors (and a missing segany) as :class:`QgsProcessingException`s, prefixed
    with ``what`` unless the core's message already names ``subject`` (a file, a layer)."""
    try:
        yield
    except QgsProcessingException:
        raise
    except ImportError as exc:
        raise QgsProcessingException(f"{what}: {missing_message()} ({exc})") from None
    except Exception as exc:
        from segany.errors import SegAnyError
        from segany.tiling import Cancelled

        if isinstance(exc, Cancelled):
            raise
        if isinstance(exc, (SegAnyError, ValueError, OSError)):
            text = str(exc)
            named = subject is not None and subject in text
            raise QgsProcessingException(text if named else f"{what}: {text}") from None
        raise


def raster_name(raster: Any) -> str:
    """The file name of a core raster (of the whole scene for an extent of it)."""
    return getattr(raster, "parent", raster).path.name


class Progress:
    """Core ``progress(done, total)`` and ``cancel()`` callbacks bound to a feedback.

    ``start``/``end`` map the core's fraction to a part of the algorithm's progress bar.
    """

    def __init__(self, feedback: QgsProcessingFeedback, start: float = 0.0, end: float = 100.0) -> None:
        self.feedback, self.start, self.end = feedback, start, end
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if total:
            self.feedback.setProgress(self.start + (self.end - self.start) * done / total)

    def cancel(self) -> bool:
        return bool(self.feedback.isCanceled())


class SegAnyAlgorithm(QgsProcessingAlgorithm):
    """Shared parameters (raster, bands, model) and helpers of the segany algorithms."""

    INPUT = "INPUT"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    MODEL = "MODEL"
    CHECKPOINT = "CHECKPOINT"
    DEVICE = "DEVICE"
    CACHE = "CACHE"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    SIMPLIFY = "SIMPLIFY"
    OUTPUT = "OUTPUT"

    def group(self) -> str:
        return "Segment Anything"

    def groupId(self) -> str:  # noqa: N802
        return "segany"

    def createInstance(self) -> "SegAnyAlgorithm":  # noqa: N802
        return type(self)()

    def helpUrl(self) -> str:  # noqa: N802
        return "https://github.com/segany/segany#qgis"

    # -------------------------------------------------------------- parameters
    def add_advanced(self, parameter: QgsProcessingParameterDefinition) -> None:
        parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(parameter)

    def add_raster_parameters(self, extent: bool) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterBand(
            self.BANDS, "Bands (1 grey or 3 RGB; default: the file's RGB or its single band)", None, self.INPUT,
            optional=True, allowMultiple=True))
        if extent:
            self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (default: the whole raster)",
                                                           optional=True))

    def add_model_parameters(self) -> None:
        self.addParameter(QgsProcessingParameterEnum(
            self.MODEL, "Model (default: segany's default model, or $SEGANY_MODEL)", options=model_names(),
            defaultValue=0))
        self.addParameter(QgsProcessingParameterFile(
            self.CHECKPOINT, "Checkpoint file (overrides the model choice)", extension="", optional=True))
        self.add_advanced(QgsProcessingParameterEnum(self.DEVICE, "Device", options=DEVICES, defaultValue=0))

    def add_grid_parameters(self) -> None:
        self.add_advanced(QgsProcessingParameterNumber(
            self.TILE_SIZE, "Tile size in pixels (0: the model's input size)", QgsProcessingParameterNumber.Integer,
            defaultValue=0, minValue=0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.OVERLAP, "Tile overlap in pixels (-1: an eighth of a tile)", QgsProcessingParameterNumber.Integer,
            defaultValue=-1, minValue=-1))

    def add_output_parameters(self) -> None:
        self.add_advanced(QgsProcessingParameterDistance(
            self.SIMPLIFY, "Simplify polygons (tolerance in the raster's units; 0: exact pixel outlines)",
            defaultValue=0.0, parentParameterName=self.INPUT, minValue=0.0))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Objects", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("N_OBJECTS", "Number of objects"))

    # -------------------------------------------------------------- reading parameters
    def raster(self, parameters: dict[str, Any], context: QgsProcessingContext, *, extent: bool = False) -> Any:
        """The input as a core :class:`segany.raster.Raster` (an extent of it when given)."""
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(f"{self.INPUT}: no raster layer given (or it cannot be loaded)")
        try:
            path = conversions.raster_path(layer)
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        with core_errors(f"raster layer '{layer.name()}'"):
            from segany.raster import open_raster

            raster = open_raster(path, bands, warn_no_crs=False)
            if extent and parameters.get(self.EXTENT) not in (None, ""):
                from segany.geo import bounds_to_window

                rect = self.parameterAsExtent(parameters, self.EXTENT, context)
                if not rect.isNull() and not rect.isEmpty():
                    crs = conversions.crs_to_core(self.parameterAsExtentCrs(parameters, self.EXTENT, context))
                    window = bounds_to_window(raster, (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(),
                                                       rect.yMaximum()), crs)
                    raster = raster.subset(window)
        return raster

    def model(self, parameters: dict[str, Any], context: QgsProcessingContext,
              feedback: QgsProcessingFeedback) -> Any:
        """A :class:`segany.tiling.TileEncoder` for the chosen model (or checkpoint file)."""
        checkpoint = self.parameterAsFile(parameters, self.CHECKPOINT, context)
        names = model_names()
        choice = names[self.parameterAsEnum(parameters, self.MODEL, context)]
        device = DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)]
        spec = checkpoint or (None if choice == DEFAULT_MODEL else choice)
        what = f"checkpoint file {checkpoint}" if checkpoint else f"model '{choice}'"
        with core_errors(what, checkpoint or choice):
            from segany.tiling import TileEncoder, default_model_spec

            if checkpoint and not os.path.isfile(checkpoint):
                raise QgsProcessingException(f"{what}: no such file")
            provider = self.provider()
            models = getattr(provider, "models", None) or ModelCache()  # no provider: a lone run
            model = models.get(spec, None if device == "auto" else device)
            encoder = TileEncoder(model)
        shown = spec or default_model_spec() or "segany's default model"
        feedback.pushInfo(f"Model: {encoder.model_type} ({shown}) on {encoder.predictor.device}")
        return encoder

    def grid(self, parameters: dict[str, Any], context: QgsProcessingContext, raster: Any, encoder: Any) -> Any:
        """The tile grid, or None for the core's default (model-size tiles, 1/8 overlap)."""
        size = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        overlap = self.parameterAsInt(parameters, self.OVERLAP, context)
        if size <= 0 and overlap < 0:
            return None
        from segany.tiling import TileGrid

        size = size if size > 0 else encoder.image_size
        with core_errors("tile grid"):
            return TileGrid(raster.height, raster.width, size, size // 8 if overlap < 0 else overlap)

    def cache(self, parameters: dict[str, Any], context: QgsProcessingContext, raster: Any) -> tuple[Any, Any]:
        """The embedding cache given in ``CACHE`` (or None) and the raster as it saw it."""
        path = self.parameterAsFile(parameters, self.CACHE, context)
        if not path:
            return None, raster
        with core_errors(f"embedding cache {path}", path):
            from segany.cache import EmbeddingCache

            cache = EmbeddingCache.open(path)
            return cache, cache.raster_for(raster)

    def sink(self, parameters: dict[str, Any], context: QgsProcessingContext, raster: Any) -> tuple[Any, str]:
        fields = conversions.output_fields()
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, conversions.OUTPUT_WKB_TYPE,
                                          conversions.crs_from_core(raster.crs))
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        return sink, dest

    def writer(self, sink: Any, raster: Any, encoder: Any, simplify: float) -> Callable[[Any], None]:
        """A core ``sink(obj)`` callback adding each finished object to the feature sink."""
        from segany.scene import model_name, object_record

        fields = conversions.output_fields()
        name = model_name(encoder)
        counter = {"n": 0}

        def add(obj: Any) -> None:
            counter["n"] += 1
            obj.id = obj.id or counter["n"]
            record = object_record(obj, raster, simplify=simplify or None, model_name=name)
            sink.addFeature(conversions.feature_from_record(record, fields), QgsFeatureSink.FastInsert)

        add.count = counter  # type: ignore[attr-defined]
        return add


class EncodeAlgorithm(SegAnyAlgorithm):
    """``segany:encode``: a raster (or an extent of it) into an embedding cache folder."""

    BATCH_SIZE = "BATCH_SIZE"

    def name(self) -> str:
        return "encode"

    def displayName(self) -> str:  # noqa: N802
        return "Encode raster (embedding cache)"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Runs the image encoder of Segment Anything over the raster (or the extent), tile by tile, "
                "and stores the embeddings in a cache folder (zarr). 'Segment with prompts' and 'Segment "
                "everything' given this cache skip the encoder, the slow part. An interrupted encode "
                "resumes where it stopped; a cache made for another raster or model is recomputed.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.add_raster_parameters(extent=True)
        self.add_model_parameters()
        self.add_grid_parameters()
        self.add_advanced(QgsProcessingParameterNumber(
            self.BATCH_SIZE, "Tiles per encoder pass", QgsProcessingParameterNumber.Integer, defaultValue=4,
            minValue=1))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Embedding cache folder"))
        self.addOutput(QgsProcessingOutputNumber("N_TILES", "Number of tiles encoded (or without data)"))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        raster = self.raster(parameters, context, extent=True)
        encoder = self.model(parameters, context, feedback)
        grid = self.grid(parameters, context, raster, encoder)
        out = self.parameterAsString(parameters, self.OUTPUT, context)
        progress = Progress(feedback)
        from segany.tiling import Cancelled, encode_raster

        with core_errors(f"encoding {raster_name(raster)} into {out}"):
            try:
                cache = encode_raster(
                    raster, encoder, out, tile_size=grid.tile_size if grid else None,
                    overlap=grid.overlap if grid else None,
                    batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                    progress=progress, cancel=progress.cancel)
                done = len(cache.grid)
            except Cancelled:
                done = progress.done
                feedback.pushInfo(f"Cancelled: {done} of {progress.total} tiles are in {out}; "
                                  "run again to encode the rest")
        return {self.OUTPUT: out, "N_TILES": done}


class SegmentPromptsAlgorithm(SegAnyAlgorithm):
    """``segany:segment_prompts``: one polygon per point group or box."""

    POINTS = "POINTS"
    LABEL_FIELD = "LABEL_FIELD"
    GROUP_FIELD = "GROUP_FIELD"
    BOXES = "BOXES"
    MAX_REFINE = "MAX_REFINE"

    def name(self) -> str:
        return "segment_prompts"

    def displayName(self) -> str:  # noqa: N802
        return "Segment with prompts (points, boxes)"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Segments one object per prompt with Segment Anything. Points: each point is an object, or, "
                "with a group field, all points sharing a value are one object; the label field says 1 "
                "(object) or 0 (background). Boxes: the bounding box of each polygon is an object (a "
                "detector's boxes give instance segmentation). Prompts may be in any CRS; objects crossing "
                "tiles come out whole. Output: polygons in the raster's CRS.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.add_raster_parameters(extent=False)
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.POINTS, "Point prompts", [QgsProcessing.TypeVectorPoint], optional=True))
        self.addParameter(QgsProcessingParameterField(
            self.LABEL_FIELD, "Label field (1 object, 0 background; default 'label', all 1 without it)",
            defaultValue="label", parentLayerParameterName=self.POINTS, optional=True))
        self.addParameter(QgsProcessingParameterField(
            self.GROUP_FIELD, "Group field (points with one value are one object)", None, self.POINTS,
            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.BOXES, "Box prompts (each feature's bounding box)", [QgsProcessing.TypeVectorPolygon],
            optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.CACHE, "Embedding cache (from 'Encode raster'; optional)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.add_model_parameters()
        self.add_advanced(QgsProcessingParameterNumber(
            self.MAX_REFINE, "Extra windows to follow objects across tile seams", QgsProcessingParameterNumber.Integer,
            defaultValue=3, minValue=0))
        self.add_output_parameters()

    def prompts(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> list[Any]:
        """Core prompts from the point and box layers (in their own CRSs)."""
        from segany.geo import prompts_from_geometries

        points = self.parameterAsSource(parameters, self.POINTS, context)
        boxes = self.parameterAsSource(parameters, self.BOXES, context)
        if points is None and boxes is None:
            raise QgsProcessingException("give prompts: a point layer (POINTS) and/or a box layer (BOXES)")
        prompts = []
        if points is not None:
            name = f"point layer '{points.sourceName()}'"
            label = self.parameterAsString(parameters, self.LABEL_FIELD, context)
            group = self.parameterAsString(parameters, self.GROUP_FIELD, context)
            field_names = points.fields().names()
            if label and label not in field_names:
                if label != "label":  # a field the user chose must exist; the default may not
                    raise QgsProcessingException(f"{name} has no field '{label}' (fields: {field_names})")
                feedback.pushInfo(f"{name} has no field 'label': every point is an object point (label 1)")
                label = ""
            if group and group not in field_names:
                raise QgsProcessingException(f"{name} has no field '{group}' (fields: {field_names})")
            geoms, labels, groups, ids = self._read(points, [label, group], feedback)
            with core_errors(name, name):
                prompts += prompts_from_geometries(
                    geoms, labels=conversions.labels_from_values(labels) if label else None,
                    groups=[str(g) for g in groups] if group else None, ids=[f"point {i}" for i in ids],
                    crs=conversions.crs_to_core(points.sourceCrs()), source=name, label_name=f"field '{label}'",
                    require_foreground=True)
        if boxes is not None:
            name = f"box layer '{boxes.sourceName()}'"
            geoms, _l, _g, ids = self._read(boxes, [], feedback)
            with core_errors(name, name):
                prompts += prompts_from_geometries(geoms, ids=[f"box {i}" for i in ids],
                                                   crs=conversions.crs_to_core(boxes.sourceCrs()), source=name)
        return prompts

    @staticmethod
    def _read(source: Any, fields: list[str], feedback: QgsProcessingFeedback) -> tuple[list, list, list, list]:
        geoms, first, second, ids = [], [], [], []
        request = QgsFeatureRequest()
        for feature in source.getFeatures(request):
            if feedback.isCanceled():
                break
            geoms.append(conversions.geometry_to_wkb(feature.geometry()))
            values = [feature[f] if f else None for f in fields] + [None, None]
            first.append(values[0])
            second.append(values[1])
            ids.append(feature.id())
        return geoms, first, second, ids

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        raster = self.raster(parameters, context)
        prompts = self.prompts(parameters, context, feedback)
        if feedback.isCanceled():
            return {}
        cache, raster = self.cache(parameters, context, raster)
        encoder = self.model(parameters, context, feedback)
        sink, dest = self.sink(parameters, context, raster)
        write = self.writer(sink, raster, encoder, self.parameterAsDouble(parameters, self.SIMPLIFY, context))
        progress = Progress(feedback)
        feedback.pushInfo(f"{len(prompts)} prompt(s) on {raster_name(raster)}")
        from segany.scene import segment
        from segany.tiling import Cancelled

        with core_errors(f"segmenting {raster_name(raster)}", raster_name(raster)):
            try:
                segment(raster, prompts, encoder, cache=cache, sink=write, progress=progress, cancel=progress.cancel,
                        max_refine=self.parameterAsInt(parameters, self.MAX_REFINE, context))
            except Cancelled:
                feedback.pushInfo(f"Cancelled after {progress.done} of {len(prompts)} prompts")
        return {self.OUTPUT: dest, "N_OBJECTS": write.count["n"]}  # type: ignore[attr-defined]


class AutomaticAlgorithm(SegAnyAlgorithm):
    """``segany:automatic``: every object of a raster (or an extent), merged across tiles."""

    POINTS_PER_SIDE = "POINTS_PER_SIDE"
    PRED_IOU_THRESH = "PRED_IOU_THRESH"
    STABILITY_SCORE_THRESH = "STABILITY_SCORE_THRESH"
    MIN_AREA = "MIN_AREA"
    MERGE_IOU = "MERGE_IOU"

    def name(self) -> str:
        return "automatic"

    def displayName(self) -> str:  # noqa: N802
        return "Segment everything (automatic)"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Segments every object of the raster (or the extent) with Segment Anything's automatic mask "
                "generator: a grid of points per tile, masks kept by predicted quality and stability, objects "
                "cut by tile seams merged into one polygon. Output: polygons in the raster's CRS, written as "
                "soon as each is final.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.add_raster_parameters(extent=True)
        self.addParameter(QgsProcessingParameterFile(
            self.CACHE, "Embedding cache (from 'Encode raster'; optional)",
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.add_model_parameters()
        self.add_advanced(QgsProcessingParameterNumber(
            self.POINTS_PER_SIDE, "Grid density: points per tile side", QgsProcessingParameterNumber.Integer,
            defaultValue=32, minValue=1, maxValue=128))
        self.add_advanced(QgsProcessingParameterNumber(
            self.PRED_IOU_THRESH, "Keep masks with a predicted IoU above", QgsProcessingParameterNumber.Double,
            defaultValue=0.88, minValue=0.0, maxValue=1.0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.STABILITY_SCORE_THRESH, "Keep masks with a stability score of at least",
            QgsProcessingParameterNumber.Double, defaultValue=0.95, minValue=0.0, maxValue=1.0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.MIN_AREA, "Drop objects smaller than (pixels)", QgsProcessingParameterNumber.Integer,
            defaultValue=0, minValue=0))
        self.add_advanced(QgsProcessingParameterNumber(
            self.MERGE_IOU, "Seam rule: merge masks of neighbouring tiles with an IoU of at least",
            QgsProcessingParameterNumber.Double, defaultValue=0.5, minValue=0.01, maxValue=1.0))
        self.add_grid_parameters()
        self.add_output_parameters()

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        raster = self.raster(parameters, context, extent=True)
        cache, raster = self.cache(parameters, context, raster)
        encoder = self.model(parameters, context, feedback)
        grid = None if cache is not None else self.grid(parameters, context, raster, encoder)
        sink, dest = self.sink(parameters, context, raster)
        write = self.writer(sink, raster, encoder, self.parameterAsDouble(parameters, self.SIMPLIFY, context))
        progress = Progress(feedback)
        from segany.scene import segment_everything
        from segany.tiling import Cancelled

        with core_errors(f"segmenting {raster_name(raster)}", raster_name(raster)):
            try:
                segment_everything(
                    raster, encoder, cache=cache, grid=grid, sink=write, progress=progress, cancel=progress.cancel,
                    merge_iou=self.parameterAsDouble(parameters, self.MERGE_IOU, context),
                    min_area=self.parameterAsInt(parameters, self.MIN_AREA, context),
                    points_per_side=self.parameterAsInt(parameters, self.POINTS_PER_SIDE, context),
                    pred_iou_thresh=self.parameterAsDouble(parameters, self.PRED_IOU_THRESH, context),
                    stability_score_thresh=self.parameterAsDouble(parameters, self.STABILITY_SCORE_THRESH, context))
            except Cancelled:
                feedback.pushInfo(f"Cancelled after {progress.done} of {progress.total} tiles; the objects "
                                  "finished so far are in the output")
        return {self.OUTPUT: dest, "N_OBJECTS": write.count["n"]}  # type: ignore[attr-defined]
