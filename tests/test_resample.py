"""segany.resample: SAM's two-step mask post-processing as banded maps, same logits."""

from __future__ import annotations

import pytest
import torch

from segany.build import build_sam
from segany.predictor import SamPredictor
from segany.resample import MaskUpsampler, postprocess_axis_matrix


@pytest.mark.parametrize(
    "input_size, out_size",
    [
        ((1024, 1024), (512, 512)),  # downsampling, square
        ((768, 1024), (600, 800)),  # crop of the padding, then down
        ((1024, 683), (3000, 2000)),  # upsampling past the model size
        ((1024, 1), (1024, 1)),  # one-pixel-wide image
        ((1, 1024), (1, 3000)),
        ((1024, 1024), (1024, 1024)),
    ],
)
def test_upsampler_equals_postprocess_masks(input_size, out_size):
    sam = build_sam("test_tiny")
    logits = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 5
    reference = sam.postprocess_masks(logits, input_size, out_size)
    ours = MaskUpsampler((256, 256), sam.img_size, input_size, out_size)(logits)
    assert ours.shape == reference.shape
    # The reference rounds after each of its two steps; the banded map once.
    assert float((ours - reference).abs().max()) < 1e-3
    assert float(((ours > 0) != (reference > 0)).float().mean()) < 1e-5


def test_axis_matrix_rows_are_short_bands_that_sum_to_one():
    m = postprocess_axis_matrix(256, 1024, 700, 1500)
    nonzero = m != 0
    assert nonzero.sum(1).max() <= 3 and abs(m.sum(1) - 1).max() < 1e-9


def test_predictor_masks_are_the_reference_postprocessing_of_its_logits():
    sam = build_sam("test_tiny")
    predictor = SamPredictor(sam)
    image = torch.randint(0, 255, (300, 420, 3), generator=torch.Generator().manual_seed(1)).numpy().astype("uint8")
    predictor.set_image(image)
    logits, _, low = predictor.predict(point_coords=[[200, 100]], point_labels=[1], return_logits=True)
    expected = sam.postprocess_masks(torch.as_tensor(low)[None], predictor.input_size, predictor.original_size)[0]
    assert logits.shape == (3, 300, 420)
    assert float((torch.as_tensor(logits) - expected).abs().max()) < 1e-3
