"""Model files end to end: build_sam/load_model with real (random-weight) checkpoint files.

These complement test_checkpoints.py (which checks the loader on synthetic dicts) by going
through the public entry points with full model files in every supported layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segany
from reference_oracle import import_mobile_sam
from segany.errors import CheckpointError


@pytest.fixture(scope="module")
def vit_t_file(tmp_path_factory):
    torch.manual_seed(0)
    sam = segany.build_sam("vit_t")
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam_like.pt"
    torch.save(sam.state_dict(), path)
    return path, sam


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_build_sam_loads_a_file_strictly(vit_t_file):
    path, original = vit_t_file
    loaded = segany.build_sam("vit_t", checkpoint=path)
    assert _same_weights(loaded, original)
    assert not loaded.training


def test_load_model_recognises_the_type_from_the_file(vit_t_file):
    path, original = vit_t_file
    loaded = segany.load_model(path, device="cpu")
    assert loaded.model_type == "vit_t" and _same_weights(loaded, original)


def test_load_model_recognises_custom_configurations(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(segany.build_sam("test_tiny").state_dict(), path)
    assert segany.load_model(str(path)).model_type == "test_tiny"


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state"])
def test_wrapped_files_load(vit_t_file, tmp_path, wrapper):
    _, original = vit_t_file
    path = tmp_path / f"wrapped_{wrapper}.pt"
    torch.save({wrapper: original.state_dict(), "epoch": 3}, path)
    assert _same_weights(segany.build_sam("vit_t", checkpoint=path), original)


def test_wrong_model_type_names_file_and_types(vit_t_file):
    path, _ = vit_t_file
    with pytest.raises(CheckpointError, match=r"mobile_sam_like\.pt.*vit_t.*vit_b|mobile_sam_like\.pt.*vit_b.*vit_t"):
        segany.build_sam("vit_b", checkpoint=path)


def test_truncated_file_is_reported_with_its_name(vit_t_file, tmp_path):
    path, _ = vit_t_file
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated"):
        segany.build_sam("vit_t", checkpoint=cut)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        segany.build_sam("vit_t", checkpoint=tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="neither an existing file nor a known checkpoint"):
        segany.load_model("no_such_model")
    with pytest.raises(CheckpointError, match="segany fetch sam_vit_b"):
        segany.load_model("sam_vit_b")  # registry name whose file is not downloaded


def test_files_that_need_code_are_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        segany.load_model(path)
    assert not marker.exists()


def test_reference_implementation_loads_our_files(vit_t_file):
    """Our files are in the official layout: MobileSAM's own builder loads them strictly."""
    path, original = vit_t_file
    mobile_sam = import_mobile_sam()
    ref = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(path))
    ref.train(False)  # builds its bias cache from the loaded weights
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)
    ours = segany.SamPredictor(original)
    theirs = mobile_sam.SamPredictor(ref)
    ours.set_image(image)
    theirs.set_image(image)
    assert (ours.get_image_embedding() - theirs.get_image_embedding()).abs().max() < 1e-4
