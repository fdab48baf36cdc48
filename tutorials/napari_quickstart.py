"""Quick start: click-to-segment nuclei in napari with segany, scripted step by step.

Everything a person does with the mouse is done here in code, with a screenshot after each
step, so the script doubles as an illustrated tutorial and as a test of the plugin:

1. open the plugin's sample data and the "Segment Anything" dock widget;
2. embed the image (in a background thread; napari stays responsive);
3. click on a nucleus: the preview shows the object; cycle the three candidates;
4. commit it (key C), then segment more objects with clicks, a negative click and a box;
5. on a 3D stack, segment a nucleus on one slice and propagate it through the stack;
6. segment everything automatically (needs a SAM model);
7. export the committed objects as training data (segany's dataset format).

Run it (headless machines need a virtual display)::

    xvfb-run -a .venv/bin/python tutorials/napari_quickstart.py --output tutorial_output
    SEGANY_TUTORIAL_OUTPUT=out xvfb-run -a .venv/bin/python tutorials/napari_quickstart.py

Screenshots (``01_embedded.png`` ...) and the exported dataset go to the output folder.

Models: by default the smallest trained model available, which is segany's own shipped
model ``segany_lite`` (no download; ``--model mobile_sam`` or a checkpoint path picks
another). With ``--model threshold`` the tutorial uses
:class:`segany.interactive.ThresholdPredictor`, a model-free stand-in that segments the
bright blob under a click: the clicks, layers and keys are exactly the same, only the masks
come from thresholding instead of SAM (and automatic segmentation is skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

STANDIN_NOTICE = (
    "NOTE: no trained model available (or --model threshold): using the model-free "
    "ThresholdPredictor stand-in."
)


def wait(signal: Any, timeout_ms: int = 600_000) -> None:
    """Run Qt's event loop until ``signal`` fires: the viewer stays live meanwhile."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    signal.connect(loop.quit)
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec_()
    signal.disconnect(loop.quit)


def settle(widget: Any) -> None:
    """Let every running worker finish and its results reach the layers."""
    from qtpy.QtWidgets import QApplication

    while not widget.idle() or widget._pending_request is not None:
        QApplication.processEvents()
        time.sleep(0.005)  # leave the CPU to the workers
    QApplication.processEvents()


def click(widget: Any, yx: tuple[float, ...], positive: bool = True) -> None:
    """What a mouse click on the image does: a point in the "segany points" layer."""
    widget.add_point(yx, positive=positive)
    settle(widget)


def snap(viewer: Any, output: Path, name: str) -> Path:
    """Screenshot of the whole window (canvas and dock widget), as the user sees it."""
    from qtpy.QtWidgets import QApplication, QWidget

    # Pop-up notifications (e.g. "exported ...") would cover the canvas: close them first.
    for child in viewer.window._qt_window.findChildren(QWidget):
        if type(child).__name__ == "NapariQtNotification":
            child.close()
    QApplication.processEvents()
    path = output / name
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"  screenshot {path}")
    return path


def fit(viewer: Any) -> None:
    """Show the whole image (once Qt has laid the window out)."""
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()


def centre_of(mask: np.ndarray) -> tuple[int, int]:
    """A pixel well inside ``mask``: where a person would click."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask)
    row, col = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(row), int(col)


def choose_model(widget: Any, wanted: str | None) -> bool:
    """Select a SAM checkpoint in the widget, or inject the stand-in; True for real SAM."""
    from segany.interactive import ThresholdPredictor, model_choices

    trained = [c for c in model_choices() if c.trained]
    if wanted == "threshold" or (wanted is None and not trained):
        print(STANDIN_NOTICE)
        widget.set_predictor(ThresholdPredictor(), name="threshold stand-in")
        return False
    widget.select_model(wanted or trained[0].spec)
    return True


def run(output: Path, model: str | None = None) -> list[Path]:
    """The tutorial; returns the screenshots written."""
    import napari

    from napari_segany._sample import nuclei_stack
    from segany.synthetic import cells_image

    output.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    # This machine's napari runs on PyQt5, which napari announces as deprecated in a pop-up
    # that would cover the screenshots; it is about the set-up, not about segany.
    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")
    viewer = napari.Viewer(show=True, title="segany quick start")
    viewer.window._qt_window.resize(1600, 950)
    try:
        # 1. Sample data and the widget, both from the plugin's manifest.
        viewer.open_sample("segany", "nuclei")
        image = viewer.layers[-1]
        _, truth = cells_image((512, 512), n_cells=24, seed=0)  # the sample's known nuclei
        _dock, widget = viewer.window.add_plugin_dock_widget("segany", "Segment Anything")
        real_sam = choose_model(widget, model)
        fit(viewer)

        # 2. Embed: the encoder runs in a worker thread with a progress bar.
        print("step 2: embedding the image")
        if widget.embed() is not None:
            wait(widget.embedding_done)
        settle(widget)
        shots.append(snap(viewer, output, "01_embedded.png"))

        # 3. One click on a nucleus; the preview layer shows the best of 3 candidates.
        print("step 3: click on a nucleus, look at the candidates")
        ids = np.unique(truth[truth > 0])
        click(widget, centre_of(truth == ids[0]))
        print("  " + widget.candidate_label.text())
        shots.append(snap(viewer, output, "02_click_preview.png"))
        widget.cycle()  # key N: the next candidate
        print("  after N: " + widget.candidate_label.text())
        shots.append(snap(viewer, output, "03_next_candidate.png"))
        widget.cycle(-1)

        # 4. Commit (key C) and go on: clicks, a negative click, a box.
        print("step 4: commit, then more objects")
        widget.commit()
        for object_id in ids[1:6]:
            click(widget, centre_of(truth == object_id))
            widget.commit()
        two = (truth == ids[6]) | (truth == ids[7])
        click(widget, centre_of(truth == ids[6]))
        click(widget, centre_of(truth == ids[7]), positive=False)  # Shift+click: not this one
        widget.commit()
        rows, cols = np.nonzero(truth == ids[8])
        widget.add_box((rows.min() - 3, cols.min() - 3), (rows.max() + 3, cols.max() + 3))
        settle(widget)
        widget.commit()
        viewer.layers.selection.active = widget.labels_layer
        shots.append(snap(viewer, output, "04_committed.png"))
        committed = int(len(np.unique(widget.labels_layer.data)) - 1)
        print(f"  {committed} objects committed (of {len(ids)} nuclei); two-object click kept "
              f"{int((widget.labels_layer.data[two] > 0).sum())} px")

        # 7 (done here, on the 2D image): export the committed objects as training data.
        print("step 7: export training data")
        written = widget.export_training_data(str(output / "dataset"))
        print(f"  wrote samples {written} to {output / 'dataset'}")

        # 6. Automatic segmentation (SAM's "segment everything").
        if real_sam:
            print("step 6: segment everything")
            if widget.segment_everything() is not None:
                wait(widget.job_done)
            settle(widget)
            shots.append(snap(viewer, output, "05_automatic.png"))
        else:
            print("step 6 skipped: automatic segmentation needs a SAM model")

        # 5. A 3D stack: segment a nucleus on one slice and propagate it.
        print("step 5: 3D stack, propagate an object through the slices")
        stack, stack_truth = nuclei_stack()
        for old in list(viewer.layers):  # a fresh start: only the stack in the viewer
            viewer.layers.remove(old)
        # Z steps 4x the pixel size: segany's layers take the image's scale.
        layer = viewer.add_image(stack, name="nuclei 3D", scale=(4, 1, 1))
        widget.image_combo.setCurrentIndex(widget.image_combo.findText(layer.name))
        target = stack_truth == np.bincount(stack_truth.ravel())[1:].argmax() + 1
        z = int(np.argmax(target.sum(axis=(1, 2))))
        viewer.dims.set_point(0, z * layer.scale[0])  # the viewer's axes are in world units
        fit(viewer)
        click(widget, (z, *centre_of(target[z])))
        if widget.propagate() is not None:
            wait(widget.job_done)
        settle(widget)
        slices = sorted(k[0] for k in widget.session.object_masks)
        print(f"  object found on slices {slices[0]}..{slices[-1]} "
              f"(truth {int(np.nonzero(target.any(axis=(1, 2)))[0].min())}.."
              f"{int(np.nonzero(target.any(axis=(1, 2)))[0].max())})")
        shots.append(snap(viewer, output, "06_propagated_slice.png"))
        widget.commit()
        widget.preview_layer.visible = False
        layer.opacity = 0.4
        viewer.dims.ndisplay = 3  # look at the committed object in 3D
        fit(viewer)
        viewer.scene.camera.angles = (0, 35, 60)
        viewer.scene.camera.zoom *= 1.2
        shots.append(snap(viewer, output, "07_propagated_3d.png"))
    finally:
        viewer.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output", "-o", type=Path,
        default=Path(os.environ.get("SEGANY_TUTORIAL_OUTPUT", "tutorial_output")),
        help="folder for screenshots and the exported dataset (or $SEGANY_TUTORIAL_OUTPUT)",
    )
    parser.add_argument(
        "--model", default=None,
        help="a model name or checkpoint path, or 'threshold' for the model-free stand-in "
        "(default: the smallest SAM checkpoint in the cache, else the stand-in)",
    )
    args = parser.parse_args(argv)
    shots = run(args.output, args.model)
    print(f"done: {len(shots)} screenshots in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
