"""The map tool on a headless ``QgsMapCanvas``: clicks and drags in canvas pixels become
prompts in the canvas CRS (Web Mercator here, the raster is UTM 33N), then raster pixels;
the core segments; the preview lands on the object; Enter adds it to a layer in yet
another CRS (WGS 84). test_scene's stand-in decoder gives known outlines."""

from __future__ import annotations

import os

import numpy as np
import pytest
import shapely
import torch
from pyproj import Transformer

from test_qgis_app import qgis_app

qgis_app()

from qgis.core import (  # noqa: E402
    QgsCoordinateReferenceSystem,
    QgsField,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent  # noqa: E402
from qgis.PyQt.QtCore import QEvent, QPoint, Qt, QVariant  # noqa: E402
from qgis.PyQt.QtGui import QKeyEvent  # noqa: E402

from qgis_segany.maptool import MapSegmenter, SegmentMapTool  # noqa: E402
from segany.geo import apply_affine  # noqa: E402
from test_scene import TRANSFORM, flood_decoder, make_scene, object_masks, truth_polygons  # noqa: E402
from test_tiling import small_model  # noqa: E402

TO_MERCATOR = Transformer.from_crs("EPSG:32633", "EPSG:3857", always_xy=True)
TO_LONLAT = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)


def reproject(geom, transformer):
    return shapely.transform(shapely.segmentize(geom, 2.0),
                             lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


@pytest.fixture
def canvas(tmp_path):
    """A 700 x 600 px canvas in Web Mercator showing the whole scene (about 1 raster pixel
    per screen pixel)."""
    c = QgsMapCanvas()
    c.resize(700, 600)
    c.show()  # the canvas takes its size (and its map-to-screen transform) when shown
    c.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    x0, y0, x1, y1 = TO_MERCATOR.transform_bounds(*TRANSFORM @ (0, 600), *TRANSFORM @ (700, 0))
    c.setExtent(QgsRectangle(x0, y0, x1, y1))
    c.refresh()
    yield c
    c.hide()
    c.deleteLater()


@pytest.fixture
def scene(tmp_path):
    return str(make_scene(tmp_path))


def screen_pos(canvas, row, col):
    """The canvas position of raster pixel (row, col)'s centre."""
    x, y = apply_affine(TRANSFORM, col + 0.5, row + 0.5)
    mx, my = TO_MERCATOR.transform(float(x), float(y))
    p = canvas.getCoordinateTransform().transform(QgsPointXY(mx, my))
    return QPoint(round(p.x()), round(p.y()))


def interior(mask):
    rows, cols = np.nonzero(mask)
    k = len(rows) // 2
    return int(rows[k]), int(cols[k])


def assert_close(got, want, tolerance):
    assert got.symmetric_difference(want).area <= tolerance * want.area, (got.bounds, want.bounds)


def test_canvas_clicks_become_raster_pixels_and_the_preview_lands_on_the_object(canvas, scene):
    seg = MapSegmenter(canvas, QgsRasterLayer(scene, "scene"), decoder=flood_decoder)
    assert seg.request() is None and seg.update() is None  # no prompt yet
    row, col = interior(object_masks()[0])
    seg.add_click(screen_pos(canvas, row, col))
    pixel = seg.pixel_prompt()
    # One screen pixel is about one raster pixel: the click lands within ~1.5 px of the target.
    assert np.abs(pixel.points[0] - [col + 0.5, row + 0.5]).max() < 1.5 and pixel.labels.tolist() == [1]
    result = seg.update()
    assert result.error is None and seg.obj.area == object_masks()[0].sum()
    preview = shapely.from_wkb(bytes(seg.preview.asWkb()))  # in the canvas CRS
    assert_close(preview, reproject(truth_polygons()[0], TO_MERCATOR), 1e-3)


def test_background_clicks_undo_and_latest_prompt_wins(canvas, scene):
    seg = MapSegmenter(canvas, scene, decoder=flood_decoder)
    r0, c0 = interior(object_masks()[4])
    seg.add_click(screen_pos(canvas, r0, c0))
    seg.add_click(screen_pos(canvas, 10, 10), foreground=False)
    assert seg.pixel_prompt().labels.tolist() == [1, 0]
    stale = seg.request()
    seg.undo()  # the background point goes; the prompt changed
    assert seg.pixel_prompt().labels.tolist() == [1]
    assert not seg.apply(seg.run(stale))  # an answer to an older prompt is dropped
    assert seg.preview is None
    assert seg.update().error is None and seg.obj.area == object_masks()[4].sum()
    seg.clear()
    assert seg.empty and seg.preview is None and seg.request() is None


def test_a_dragged_box_segments_an_object_across_tiles(canvas, scene):
    seg = MapSegmenter(canvas, scene, decoder=flood_decoder)
    rows, cols = np.nonzero(object_masks()[1])  # 460 px wide, across three 256 px tiles
    seg.set_box_from_canvas(screen_pos(canvas, rows.min() - 4, cols.min() - 4),
                            screen_pos(canvas, rows.max() + 4, cols.max() + 4))
    box = seg.pixel_prompt().box
    assert box[0] < cols.min() and box[2] > cols.max() + 1 and box[1] < rows.min() and box[3] > rows.max() + 1
    assert seg.update().error is None
    assert seg.obj.area == object_masks()[1].sum()  # whole, not cut at a tile seam


def test_accept_adds_the_object_to_a_layer_in_its_crs(canvas, scene):
    seg = MapSegmenter(canvas, scene, decoder=flood_decoder)
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "objects", "memory")
    layer.dataProvider().addAttributes([QgsField("predicted_iou", QVariant.Double), QgsField("note", QVariant.String)])
    layer.updateFields()
    with pytest.raises(ValueError, match="nothing to accept"):
        seg.accept(layer)
    seg.add_click(screen_pos(canvas, *interior(object_masks()[0])))
    seg.update()
    points = QgsVectorLayer("Point?crs=EPSG:4326", "pts", "memory")
    with pytest.raises(ValueError, match="'pts' is not a polygon layer"):
        seg.accept(points)
    feature = seg.accept(layer)
    assert layer.isEditable() and layer.featureCount() == 1 and seg.empty  # ready for the next object
    got = shapely.from_wkb(bytes(next(layer.getFeatures()).geometry().asWkb()))
    assert_close(got, reproject(truth_polygons()[0], TO_LONLAT), 1e-3)
    assert feature["predicted_iou"] == pytest.approx(0.9) and feature["note"] is None or str(feature["note"]) == "NULL"
    layer.rollBack()


def mouse(canvas, kind, pos, button):
    buttons = Qt.NoButton if kind == QEvent.MouseButtonRelease else button
    return QgsMapMouseEvent(canvas, kind, pos, button, buttons, Qt.NoModifier)


def test_map_tool_events_click_drag_and_keys(canvas, scene):
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633", "objects", "memory")
    seg = MapSegmenter(canvas, scene, decoder=flood_decoder)
    tool = SegmentMapTool(canvas, seg, target=lambda: layer, synchronous=True)
    canvas.setMapTool(tool)
    accepted, messages = [], []
    tool.accepted.connect(accepted.append)
    tool.message.connect(messages.append)

    pos = screen_pos(canvas, *interior(object_masks()[4]))
    tool.canvasPressEvent(mouse(canvas, QEvent.MouseButtonPress, pos, Qt.LeftButton))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.MouseButtonRelease, pos, Qt.LeftButton))
    assert seg.points and seg.points[0][1] == 1 and seg.obj.area == object_masks()[4].sum()
    assert not tool.preview_band.asGeometry().isEmpty()  # the preview is drawn
    right = screen_pos(canvas, 20, 20)
    tool.canvasPressEvent(mouse(canvas, QEvent.MouseButtonPress, right, Qt.RightButton))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.MouseButtonRelease, right, Qt.RightButton))
    assert [label for _p, label in seg.points] == [1, 0]
    tool.keyPressEvent(QKeyEvent(QEvent.KeyPress, Qt.Key_Backspace, Qt.NoModifier))
    assert [label for _p, label in seg.points] == [1]
    tool.keyPressEvent(QKeyEvent(QEvent.KeyPress, Qt.Key_Return, Qt.NoModifier))
    assert len(accepted) == 1 and layer.featureCount() == 1 and seg.empty
    assert tool.preview_band.asGeometry().isEmpty()

    # A drag is a box.
    rows, cols = np.nonzero(object_masks()[1])
    start, end = screen_pos(canvas, rows.min() - 4, cols.min() - 4), screen_pos(canvas, rows.max() + 4, cols.max() + 4)
    tool.canvasPressEvent(mouse(canvas, QEvent.MouseButtonPress, start, Qt.LeftButton))
    tool.canvasMoveEvent(mouse(canvas, QEvent.MouseMove, end, Qt.LeftButton))
    tool.canvasReleaseEvent(mouse(canvas, QEvent.MouseButtonRelease, end, Qt.LeftButton))
    assert seg.box is not None and not seg.points and seg.obj.area == object_masks()[1].sum()
    tool.keyPressEvent(QKeyEvent(QEvent.KeyPress, Qt.Key_Escape, Qt.NoModifier))
    assert seg.empty and tool.preview_band.asGeometry().isEmpty()
    tool.keyPressEvent(QKeyEvent(QEvent.KeyPress, Qt.Key_Return, Qt.NoModifier))
    assert messages[-1].startswith("nothing to accept")
    layer.rollBack()
    canvas.unsetMapTool(tool)


def test_real_model_keeps_window_embeddings_between_clicks(canvas, tmp_path, scene):
    torch.save(small_model().state_dict(), tmp_path / "small.pth")
    seg = MapSegmenter(canvas, scene, str(tmp_path / "small.pth"))
    encoder = seg.encoder()
    assert encoder.model_type == "segany_geo_test"
    calls = []
    encode = encoder.encode
    encoder.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    pos = screen_pos(canvas, 80, 100)
    seg.add_click(pos)
    first = seg.update()  # random weights: a mask (maybe refined on bigger windows) or none
    assert first.error is None or "no object" in first.error
    encoded = len(calls)
    assert encoded >= 1
    seg.undo()
    seg.add_click(pos)  # the same click again (e.g. after an undo): no encoder run at all
    second = seg.update()
    assert len(calls) == encoded and second.error == first.error
    if first.error is None:
        assert seg.obj.area == first.obj.area


def test_dock_builds_a_segmenter_for_the_chosen_raster(canvas, scene):
    from qgis_segany.plugin import SegmentDock

    class Iface:  # the part of QgisInterface the dock uses
        def mapCanvas(self):  # noqa: N802
            return canvas

    raster = QgsRasterLayer(scene, "scene")
    QgsProject.instance().addMapLayer(raster)
    try:
        from qgis_segany.provider import SegAnyProvider

        provider = SegAnyProvider()
        dock = SegmentDock(Iface(), provider.models)
        dock.raster_box.setLayer(raster)
        dock.activate(True)
        assert canvas.mapTool() is dock.tool and dock.tool.segmenter is not None
        assert dock.tool.segmenter.raster.path.name == "scene.tif"
        # The map tool and the Processing algorithms share the provider's model cache.
        assert dock.tool.segmenter.models is provider.models
        dock.activate(False)
        assert canvas.mapTool() is None
    finally:
        QgsProject.instance().removeMapLayer(raster.id())


def test_model_cache_keeps_the_last_model_per_file_identity(tmp_path):
    import warnings

    import torch

    from qgis_segany.algorithms import ModelCache

    cache = ModelCache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # test_tiny: "random weights" warning
        first = cache.get("test_tiny", "cpu")
        assert cache.get("test_tiny", "cpu") is first
        path = tmp_path / "tiny.pt"
        torch.save(first.state_dict(), path)
        from_file = cache.get(str(path), "cpu")
        assert from_file is not first and cache.get(str(path), "cpu") is from_file
        stat = path.stat()  # the file replaced by another (new mtime): loaded again
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert cache.get(str(path), "cpu") is not from_file
