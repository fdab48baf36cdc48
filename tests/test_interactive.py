"""segany.interactive without any GUI: prompts, stale results, commit/undo, caches, cancel,
tiles, propagation, image types and export."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import segany
from segany.errors import CheckpointError, ImageError, PromptError, SegAnyError
from segany.interactive import (
    Cancelled,
    EmbeddingCache,
    InteractiveSession,
    ThresholdPredictor,
    box_for_slice,
    cancellable,
    export_training_data,
    make_predictor,
    mask_to_logits,
    model_choices,
    points_for_slice,
)


class CountingPredictor(ThresholdPredictor):
    """The stand-in predictor, counting encoder runs and decodes (and optionally slow)."""

    def __init__(self, encode_delay: float = 0.0, decode_delay: float = 0.0) -> None:
        super().__init__()
        self.encodes = 0
        self.decodes = 0
        self.encode_delay = encode_delay
        self.decode_delay = decode_delay

    def set_image(self, *args, **kwargs):
        self.encodes += 1
        time.sleep(self.encode_delay)
        super().set_image(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self.decodes += 1
        time.sleep(self.decode_delay)
        return super().predict(*args, **kwargs)


def squares(shape=(64, 64), value=200, dtype=np.uint8):
    """Two squares: A at rows/cols 8-24, B at rows 36-56, cols 30-50."""
    image = np.zeros(shape, dtype)
    image[8:24, 8:24] = value
    image[36:56, 30:50] = value
    return image


def decode_now(session, **prompt):
    request = session.set_prompt(**prompt)
    assert request is not None
    assert session.accept(session.decode(request))
    return session.mask


# ------------------------------------------------------------------------------------ prompts


def test_prompt_validation_messages():
    session = InteractiveSession(ThresholdPredictor(), squares())
    with pytest.raises(PromptError, match="1 \\(inside the object\\) or 0"):
        session.set_prompt(points=[[5, 5]], labels=[2])
    with pytest.raises(PromptError, match="x1 < x0"):
        session.set_prompt(box=[10, 10, 5, 20])
    with pytest.raises(PromptError, match="outside the image"):
        session.set_prompt(points=[[70, 5]])
    with pytest.raises(PromptError, match="2 points but 1 labels"):
        session.set_prompt(points=[[1, 1], [2, 2]], labels=[1])
    with pytest.raises(PromptError, match="mask prompt is 8 x 8"):
        session.set_prompt(mask=np.ones((8, 8), bool))
    with pytest.raises(SegAnyError, match="slice \\(3,\\) does not exist"):
        session.set_prompt(points=[[1, 1]], slice_key=(3,))


def test_layer_coordinates_to_prompts_in_4d():
    coords = np.array([[1, 2, 10.4, 20.6], [1, 3, 5, 5], [1, 2, -3, 4], [1, 2, 0, 0]])
    xy, labels, left_out = points_for_slice(coords, [True, True, True, False], (1, 2), (32, 32))
    # Snapped to the pixel under the point (napari's pixel i spans i - 0.5 .. i + 0.5).
    assert xy.tolist() == [[21.0, 10.0], [0.0, 0.0]] and labels.tolist() == [1, 0] and left_out == 1
    ellipse = np.array([[1, 2, 0, 0], [1, 2, 0, 9], [1, 2, 9, 9], [1, 2, 9, 0]])
    rect = np.array([[1, 2, 4, 5], [1, 2, 4, 50], [1, 2, 20, 50], [1, 2, 20, 5]])
    assert box_for_slice([rect, ellipse], (1, 2), (32, 40), ["rectangle", "ellipse"]).tolist() == [5, 4, 39, 20]
    assert box_for_slice([rect], (0, 2), (32, 40)) is None


def test_multimask_policy():
    session = InteractiveSession(ThresholdPredictor(), squares())
    assert session.set_prompt(points=[[12, 12]]).multimask is True  # ambiguous single click
    assert session.set_prompt(points=[[12, 12], [14, 14]], labels=[1, 0]).multimask is False
    assert session.set_prompt(box=[5, 5, 30, 30]).multimask is False
    forced = InteractiveSession(ThresholdPredictor(), squares(), multimask=True)
    assert forced.set_prompt(box=[5, 5, 30, 30]).multimask is True


def test_unchanged_prompt_is_not_decoded_again_and_empty_prompt_drops_the_mask():
    session = InteractiveSession(ThresholdPredictor(), squares())
    decode_now(session, points=[[12, 12]])
    assert session.set_prompt(points=[[12, 12]]) is None
    assert session.mask is not None
    assert session.set_prompt() is None
    assert session.mask is None and session.candidates is None


def test_stale_results_are_dropped_latest_prompt_wins():
    session = InteractiveSession(ThresholdPredictor(), squares())
    first = session.set_prompt(points=[[12, 12]])
    second = session.set_prompt(points=[[40, 45]])
    late_first, second_result = session.decode(first), session.decode(second)
    assert session.accept(second_result)
    assert not session.accept(late_first)  # arrives after the newer one: ignored
    assert session.mask[45, 40] and not session.mask[12, 12]
    third = session.set_prompt(points=[[12, 12]])
    session.clear()
    assert not session.accept(session.decode(third))  # cleared meanwhile


def test_negative_point_and_box_and_mask_prompts():
    image = np.zeros((40, 60), np.uint8)
    image[10:30, 5:55] = 200  # one long bar
    session = InteractiveSession(ThresholdPredictor(), image)
    whole = decode_now(session, points=[[10, 20]])
    cut = decode_now(session, points=[[10, 20], [50, 20]], labels=[1, 0])
    assert whole[20, 50] and not cut[20, 50] and cut[20, 10]
    session.clear()
    boxed = decode_now(session, box=[2, 8, 58, 32])
    assert len(session.candidates.masks) == 1 and boxed.sum() == 20 * 50
    session.clear()
    prior = np.zeros((40, 60), bool)
    prior[12:28, 8:50] = True
    from_mask = decode_now(session, mask=prior)  # a mask alone gets its box added
    assert np.array_equal(from_mask, prior)


def test_cycle_through_candidates():
    image = np.zeros((48, 48), np.uint8)
    image[4:44, 4:44] = 90
    image[14:34, 14:34] = 250
    session = InteractiveSession(ThresholdPredictor(), image)
    decode_now(session, points=[[24, 24]])
    sizes = set()
    for _ in range(3):
        sizes.add(int(session.mask.sum()))
        session.cycle()
    assert sizes == {40 * 40, 20 * 20}  # nested objects: the candidates disagree
    with pytest.raises(SegAnyError, match="no candidates"):
        InteractiveSession(ThresholdPredictor(), image).cycle()


# ------------------------------------------------------------------------------------ commit / undo


def test_commit_keeps_earlier_objects_unless_asked_and_undo_restores():
    session = InteractiveSession(ThresholdPredictor(), squares())
    labels = np.zeros((64, 64), np.uint16)
    labels[8:12, 8:24] = 7  # an earlier object overlapping square A
    decode_now(session, points=[[15, 15]])
    edit = session.commit(labels)
    assert edit.object_id == 8 and (labels == 7).sum() == 4 * 16 and (labels == 8).sum() == 12 * 16
    assert session.mask is None and session.candidates is None  # ready for the next object
    decode_now(session, points=[[15, 15]])
    session.commit(labels, overwrite=True)
    assert (labels == 9).sum() == 16 * 16
    session.undo(labels)
    session.undo(labels)
    assert (labels == 7).sum() == 4 * 16 and labels.max() == 7
    assert session.undo(labels) is None
    with pytest.raises(SegAnyError, match="nothing to commit"):
        session.commit(labels)


def test_commit_through_a_writer_and_id_range_check():
    session = InteractiveSession(ThresholdPredictor(), squares())
    calls = []
    labels = np.zeros((64, 64), np.uint8)
    decode_now(session, points=[[15, 15]])
    session.commit(labels, write=lambda idx, value: calls.append((len(idx[0]), value)))
    assert calls == [(256, 1)] and labels.max() == 0
    labels[0, 0] = 255
    decode_now(session, points=[[40, 45]])
    with pytest.raises(SegAnyError, match="does not fit the label image's type uint8"):
        session.commit(labels)


# ------------------------------------------------------------------------------------ embeddings


def test_cache_hits_skip_the_encoder_and_are_shared_between_sessions():
    predictor = CountingPredictor()
    cache = EmbeddingCache()
    stack = np.stack([squares(), squares()[::-1]])
    first = InteractiveSession(predictor, stack, cache=cache, cache_key="stack")
    assert not first.embed((0,)).cached and first.embed((0,)).cached
    first.embed((1,))
    assert predictor.encodes == 2
    again = InteractiveSession(predictor, stack, cache=cache, cache_key="stack")
    for key in [(0,), (1,), (0,)]:
        again.set_slice(key)
        again.clear()
        decode_now(again, points=[[15, 15]])
    assert predictor.encodes == 2  # switching slices uses cached embeddings
    assert again.mask[15, 15]


def test_cache_evicts_least_recently_used_within_budget():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, np.zeros(100, np.float32))
    cache.get("a")
    cache.put("d", np.zeros(100, np.float32))
    assert "a" in cache and "b" not in cache and len(cache) == 3
    assert cache.discard(lambda key: key in ("a", "c")) == 2 and cache.nbytes == 400


def test_cancel_interrupts_the_real_encoder_and_leaves_nothing_cached():
    predictor = segany.SamPredictor(segany.build_sam("test_tiny"))
    session = InteractiveSession(predictor, np.random.default_rng(0).integers(0, 255, (40, 40), np.uint8))
    stop = threading.Event()
    # As if the user pressed Cancel while the encoder is in its first block.
    handle = predictor.model.image_encoder.blocks[0].register_forward_hook(lambda *_: stop.set())
    try:
        with pytest.raises(Cancelled):
            session.embed(cancel=stop)
    finally:
        handle.remove()
    assert not session.has_embedding()
    stop.clear()
    assert not session.embed(cancel=stop).cached and session.has_embedding()
    with cancellable(predictor, None):  # no event: no hooks, no effect
        predictor.set_image(np.zeros((8, 8, 3), np.uint8) + np.arange(8)[:, None, None].astype(np.uint8))


def test_embed_slices_stops_between_slices():
    predictor = CountingPredictor()
    session = InteractiveSession(predictor, np.stack([squares()] * 5))
    stop = threading.Event()
    reports = []
    with pytest.raises(Cancelled):
        for report in session.embed_slices(session.all_slice_keys(), stop):
            reports.append(report)
            if len(reports) == 2:
                stop.set()
    assert len(reports) == 2 and predictor.encodes == 2


def test_blank_slices_and_tiles_do_not_stop_embedding_everything():
    stack = np.stack([np.zeros((64, 64), np.uint8), squares(), np.full((64, 64), 7, np.uint8)])
    session = InteractiveSession(ThresholdPredictor(), stack)
    reports = list(session.embed_slices(session.all_slice_keys()))
    assert [r.blank for r in reports] == [(None,), (), (None,)]
    assert session.has_embedding((1,)) and not session.embedding_jobs(session.all_slice_keys())
    with pytest.raises(ImageError, match="slice \\(0,\\) is blank"):
        session.decode(session.set_prompt(points=[[5, 5]], slice_key=(0,)))
    with pytest.raises(ImageError, match="constant"):
        InteractiveSession(ThresholdPredictor(), np.zeros((8, 8), np.uint8)).embed()
    wide = np.zeros((64, 300), np.uint8)
    wide[10:30, 250:280] = 200  # only the last tile has anything in it
    tiled = InteractiveSession(ThresholdPredictor(), wide, tile_size=64, tile_overlap=16)
    report = tiled.embed()
    assert len(report.blank) == len(tiled.grid) - 2 and tiled.has_embedding()


def test_decoding_while_another_thread_embeds_uses_the_right_slice():
    predictor = CountingPredictor(encode_delay=0.05, decode_delay=0.01)
    stack = np.stack([squares(), np.zeros((64, 64), np.uint8) + np.eye(64, dtype=np.uint8)] * 4)
    session = InteractiveSession(predictor, stack)
    session.embed((0,))
    request = session.set_prompt(points=[[15, 15]], slice_key=(0,))
    results = []
    embedder = threading.Thread(target=lambda: list(session.embed_slices([(k,) for k in range(1, 8)])))
    embedder.start()
    for _ in range(5):
        results.append(session.decode(request))
    embedder.join()
    for result in results:
        assert result.masks[int(np.argmax(result.scores))].sum() == 256  # square A of slice 0
        assert result.thread_id == threading.get_ident()


# ------------------------------------------------------------------------------------ tiles


def test_tiled_decoding_picks_the_tile_and_pastes_masks_back():
    image = np.zeros((300, 500), np.uint16)
    image[240:270, 430:480] = 5000  # an object near the bottom-right corner
    image[20:280, 20:60] = 3000  # a tall object, longer than a tile
    predictor = CountingPredictor()
    session = InteractiveSession(predictor, image, tile_size=128, tile_overlap=32)
    assert session.tiled and len(session.frames()) == len(session.grid)
    request = session.set_prompt(points=[[455, 255]])
    (missing,) = session.missing_embeddings(request)
    assert missing[1] is not None
    assert session.accept(session.decode(request))
    mask = session.mask
    assert mask.shape == (300, 500) and mask.sum() == 30 * 50 and mask[255, 455]
    assert predictor.encodes == 1  # only the tile under the click was encoded
    # A box longer than any tile goes to the whole (downscaled) image.
    request = session.set_prompt(box=[15, 15, 65, 285])
    assert session.missing_embeddings(request) == [((), None)]
    assert session.accept(session.decode(request))
    assert session.mask[150, 40] and session.candidates.frame is None


def test_tiled_decoding_with_the_real_model():
    image = np.random.default_rng(0).integers(0, 255, (200, 1100), np.uint8)
    session = InteractiveSession(make_predictor("test_tiny"), image)
    assert session.tiled and len(session.grid) == 2  # 1100 px wide: two 1024 px tiles
    mask = decode_now(session, points=[[1050, 100]])
    assert mask.shape == (200, 1100)
    assert session.candidates.frame == 1 and session.candidates.logits.shape == (3, 256, 256)


# ------------------------------------------------------------------------------------ prefetching


def test_a_click_where_the_pointer_rested_is_answered_from_the_prefetch_without_decoding():
    predictor = CountingPredictor()
    session = InteractiveSession(predictor, squares())
    # Nothing is prefetched before the slice is embedded: a hover never runs the encoder.
    assert session.speculate(points=[[12, 12]], labels=[1]) is None and predictor.encodes == 0
    session.embed()
    # The pointer rests on a pixel: the prompt a click there would give is decoded ahead.
    hover_xy, _, _ = points_for_slice(np.array([[12.3, 11.8]]), [True], (), (64, 64))
    ahead = session.speculate(points=hover_xy, labels=[1])
    assert ahead is not None and ahead.generation == -1 and ahead.multimask
    ahead_result = session.decode(ahead)
    assert not session.accept(ahead_result)  # a speculation is never an answer by itself
    assert session.mask is None and session.generation == 0  # ... and changed nothing
    session.remember(ahead_result)
    assert session.speculate(points=hover_xy, labels=[1]) is None  # prefetched already
    decodes = predictor.decodes
    # The click lands a fraction of a pixel away: same pixel, same prompt.
    click_xy, _, _ = points_for_slice(np.array([[11.7, 12.4]]), [True], (), (64, 64))
    request = session.set_prompt(points=click_xy, labels=[1])
    hit = session.prefetched(request)
    assert hit is not None and hit.request is request and hit.ahead and predictor.decodes == decodes
    assert session.accept(hit) and session.mask.sum() == 16 * 16 and session.mask[12, 12]
    assert session.prefetched(request) is None  # used up
    # A different prompt (a second, negative point) is not answered by the old prefetch.
    session.remember(session.decode(session.speculate(points=[[14, 12]], labels=[1])))
    two = session.set_prompt(points=[[12, 12], [45, 40]], labels=[1, 0])
    assert session.prefetched(two) is None
    # Prompts that need no prefetch: current already, empty, outside the image, bad slice.
    assert session.speculate(points=[[12, 12], [45, 40]], labels=[1, 0]) is None
    assert session.speculate() is None
    assert session.speculate(points=[[99, 12]], labels=[1]) is None
    assert session.speculate(points=[[12, 12]], labels=[1], slice_key=(1,)) is None
    with pytest.raises(SegAnyError, match="speculate"):
        session.remember(session.decode(two))


def test_prefetch_keeps_only_the_latest_pointer_positions_and_matches_slice_and_mode():
    session = InteractiveSession(ThresholdPredictor(), np.stack([squares(), squares()]))
    session.embed(slice_key=(0,))
    for x in (10, 12, 14):
        session.remember(session.decode(session.speculate(points=[[x, 12]], labels=[1], slice_key=(0,))))
    assert session.prefetched(session.set_prompt(points=[[10, 12]], slice_key=(0,))) is None  # evicted
    assert session.prefetched(session.set_prompt(points=[[14, 12]], slice_key=(0,))) is not None
    # Same prompt on another slice: another embedding, so no match (and no prefetch there yet).
    assert session.speculate(points=[[12, 12]], labels=[1], slice_key=(1,)) is None
    assert session.prefetched(session.set_prompt(points=[[12, 12]], slice_key=(1,))) is None
    # Single-mask mode wants a different output for the same point.
    session.remember(session.decode(session.speculate(points=[[20, 20]], labels=[1], slice_key=(0,))))
    session.multimask = False
    assert session.prefetched(session.set_prompt(points=[[20, 20]], slice_key=(0,))) is None
    session.multimask = "auto"
    session.forget_prefetched()
    assert session.prefetched(session.set_prompt(points=[[12, 12]], slice_key=(0,))) is None


def test_prefetched_answer_equals_the_real_decoders_answer():
    image = squares(shape=(96, 80))
    session = InteractiveSession(make_predictor("test_tiny"), image)
    session.embed()
    session.remember(session.decode(session.speculate(points=[[15, 14], [40, 45]], labels=[1, 0])))
    request = session.set_prompt(points=[[15, 14], [40, 45]], labels=[1, 0])
    hit, fresh = session.prefetched(request), session.decode(request)
    assert np.array_equal(hit.masks, fresh.masks) and np.allclose(hit.scores, fresh.scores)
    assert np.allclose(hit.logits, fresh.logits) and hit.frame == fresh.frame


def test_no_prefetch_on_a_tile_that_is_not_embedded():
    image = np.zeros((300, 500), np.uint8)
    image[240:270, 430:480] = 200
    predictor = CountingPredictor()
    session = InteractiveSession(predictor, image, tile_size=128, tile_overlap=32)
    assert session.speculate(points=[[455, 255]], labels=[1]) is None and predictor.encodes == 0
    session.accept(session.decode(session.set_prompt(points=[[455, 255]])))  # embeds that tile
    assert session.speculate(points=[[450, 250]], labels=[1]) is not None  # same tile: cached
    assert session.speculate(points=[[20, 20]], labels=[1]) is None  # another tile
    assert predictor.encodes == 1


# ------------------------------------------------------------------------------------ propagation


def ball_stack(depth=11, size=48, radius=14, centre=5):
    z, y, x = np.mgrid[:depth, :size, :size]
    ball = (z - centre) ** 2 * 25 + (y - size // 2) ** 2 + (x - size // 2) ** 2 < radius**2
    return ball.astype(np.uint8) * 200 + 10, ball


def test_propagation_follows_the_object_and_stops_where_it_vanishes():
    stack, ball = ball_stack()
    session = InteractiveSession(ThresholdPredictor(), stack)
    session.set_slice((5,))
    decode_now(session, points=[[24, 24]])
    steps = session.propagate_all()
    assert sorted(k[0] for k in session.object_masks) == [3, 4, 5, 6, 7]
    assert all(np.array_equal(session.object_masks[(z,)], ball[z]) for z in range(3, 8))
    assert {s.slice_key[0] for s in steps if s.reason} == {2, 8}
    labels = np.zeros(stack.shape, np.uint16)
    edit = session.commit(labels)
    assert np.array_equal(labels > 0, ball & (np.arange(11) >= 3)[:, None, None] & (np.arange(11) <= 7)[:, None, None])
    assert edit.prompts[(5,)]["points"] == [[24.0, 24.0]] and edit.prompts[(4,)] == {"propagated": True}


def test_propagation_options_cancel_and_stale_steps():
    stack, _ = ball_stack()
    session = InteractiveSession(ThresholdPredictor(), stack)
    session.set_slice((5,))
    decode_now(session, points=[[24, 24]])
    steps = list(session.propagate(direction="forward", max_slices=1))
    assert [s.slice_key for s in steps] == [(6,)]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        list(session.propagate(cancel=stop))
    step = next(session.propagate())
    session.set_prompt(points=[[20, 24]])  # the user changed the object meanwhile
    assert not session.apply_step(step)
    with pytest.raises(SegAnyError, match="2D"):
        InteractiveSession(ThresholdPredictor(), squares()).propagate_all()
    with pytest.raises(SegAnyError, match="segment the object on the current slice first"):
        InteractiveSession(ThresholdPredictor(), stack).propagate_all()


def test_propagation_along_time_of_a_4d_series():
    series = np.random.default_rng(0).integers(0, 255, (3, 2, 40, 40), np.uint8)
    session = InteractiveSession(ThresholdPredictor(), series)
    session.set_slice((1, 0))
    session.object_masks[(1, 0)] = np.zeros((40, 40), bool)
    session.object_masks[(1, 0)][10:30, 10:30] = True
    steps = list(session.propagate(axis=0, min_area_fraction=0, min_iou=0, min_pixels=0))
    assert [s.slice_key for s in steps] == [(2, 0), (0, 0)]


# ------------------------------------------------------------------------------------ image types


@pytest.mark.parametrize("kind", ["uint16", "float_nan", "rgb_stack"])
def test_image_types(kind):
    base = squares()
    if kind == "uint16":
        image = base.astype(np.uint16) * 40 + 1000
    elif kind == "float_nan":
        image = base.astype(np.float32) / 255
        image[0:4, 0:4] = np.nan
    else:
        image = np.stack([np.stack([base, base // 2, base], -1)] * 2)
    session = InteractiveSession(ThresholdPredictor(), image)
    if kind == "rgb_stack":
        assert session.rgb and session.labels_shape == (2, 64, 64)
        session.set_slice((1,))
    mask = decode_now(session, points=[[15, 15]])
    assert mask.sum() == 256
    if kind == "uint16":
        assert session.value_range == pytest.approx((1000.0, 9000.0))


def test_a_stack_gets_one_intensity_range_for_all_slices():
    stack = np.stack([squares(value=100, dtype=np.uint16) + 50, squares(value=4000, dtype=np.uint16) + 50])
    session = InteractiveSession(ThresholdPredictor(), stack)
    low, high = session.value_range
    assert low == 50 and high > 3000
    dim = session.prepared_rgb((0,))
    assert dim.max() < 20  # the dim slice stays dim: the same stretch everywhere


def test_mask_logits_feed_the_real_decoder():
    predictor = make_predictor("test_tiny")
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (30, 50), np.uint8))
    mask = np.zeros((30, 50), bool)
    mask[5:20, 10:30] = True
    masks, scores, _ = predictor.predict(mask_input=mask_to_logits(mask), box=np.array([10, 5, 29, 19]),
                                         multimask_output=False)
    assert masks.shape == (1, 30, 50)


def test_model_choices_and_make_predictor_errors():
    assert model_choices()[-1].spec == "test_tiny"
    assert not model_choices()[-1].trained
    with pytest.raises(CheckpointError, match="neither an existing file nor a known checkpoint"):
        make_predictor("no_such_model")


def test_automatic_on_a_cached_slice_needs_no_encoder_pass():
    predictor = make_predictor("test_tiny")
    session = InteractiveSession(predictor, np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8))
    session.embed()
    encoded = []
    handle = predictor.model.image_encoder.register_forward_pre_hook(lambda *_: encoded.append(1))
    try:
        labels = session.automatic(points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0)
    finally:
        handle.remove()
    assert labels.shape == (40, 50) and labels.dtype == np.int32 and not encoded
    assert not InteractiveSession(ThresholdPredictor(), squares()).has_embedding()
    with pytest.raises(SegAnyError, match="Sam or SamPredictor"):
        InteractiveSession(ThresholdPredictor(), squares()).automatic(points_per_side=2)


# ------------------------------------------------------------------------------------ export


def test_export_rgb_stack_with_prompts(tmp_path):
    from segany.datasets import FolderDataset

    image = np.stack([np.stack([squares()] * 3, -1)] * 3)
    session = InteractiveSession(ThresholdPredictor(), image)
    labels = np.zeros(session.labels_shape, np.uint16)
    session.set_slice((2,))
    decode_now(session, points=[[15, 15]])
    session.commit(labels)
    names = export_training_data(tmp_path, "rgb", image, labels, prompts=session.committed_prompts,
                                 source="layer rgb")
    assert names == ["rgb_0002"]
    sample = FolderDataset(tmp_path)[0]
    assert sample.image.shape == (64, 64, 3) and sample.ids.tolist() == [1]
    prompts = json.loads((tmp_path / "prompts" / "rgb_0002.json").read_text())
    assert prompts["objects"]["1"][0]["points"] == [[15.0, 15.0]]
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["samples"]["rgb_0002"]["source"] == "layer rgb"
    with pytest.raises(SegAnyError, match="labels have shape"):
        export_training_data(tmp_path, "bad", image, labels[0])
