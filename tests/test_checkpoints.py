"""Tests for segany.checkpoints: registry, cache, verification, download, safe loading.

No network: registry entries are pointed at local files (file:// URLs) with monkeypatch, and
the offline case uses a closed port on 127.0.0.1. Every test runs in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

try:
    import segany.checkpoints  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from segany import checkpoints as ck
from segany.checkpoints import (
    REGISTRY,
    STATUS_LOADS,
    STATUS_MISSING,
    STATUS_PRESENT,
    STATUS_VERIFIED,
    CheckpointInfo,
    check_state_dict,
    checkpoint_path,
    describe_state_dict,
    fetch,
    guess_model_type,
    list_checkpoints,
    load_state_dict,
    resolve_checkpoint,
    segany_home,
    verify,
)
from segany.errors import CheckpointError, SegAnyError

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def vit_state(width: int = 768, depth: int | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """A tiny stand-in for a SAM ViT state dict: only the shapes that identify it matter.

    ``depth`` defaults to the official depth for the official widths (12/24/32 blocks).
    """
    if depth is None:
        depth = {768: 12, 1024: 24, 1280: 32}.get(width, 2)
    state = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 1, 1),
        "image_encoder.pos_embed": torch.zeros(1, 4, 4, width),
        "image_encoder.neck.0.weight": torch.zeros(8, width, 1, 1),
        "prompt_encoder.no_mask_embed.weight": torch.zeros(1, 8),
        "mask_decoder.iou_token.weight": torch.zeros(1, 8),
    }
    for i in range(depth):
        state[f"image_encoder.blocks.{i}.norm1.weight"] = torch.ones(width)
    return {prefix + key: value for key, value in state.items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(monkeypatch, name: str, source: Path, *, model_type: str = "vit_b",
             size: int | None | str = "auto", sha256: str | None = "auto",
             url: str | None = None, filename: str | None = None) -> CheckpointInfo:
    """Put a registry entry for a local file (real size and sha256 unless overridden)."""
    info = CheckpointInfo(
        name=name,
        model_type=model_type,
        url=url if url is not None else source.as_uri(),
        filename=filename or f"{name}.pth",
        size=source.stat().st_size if size == "auto" else size,
        sha256=sha256_of(source) if sha256 == "auto" else sha256,
        description="test entry",
        license="test",
        source="tests",
    )
    monkeypatch.setitem(REGISTRY, name, info)
    return info


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (so connecting fails at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "segany-home"
    monkeypatch.setenv("SEGANY_HOME", str(path))
    return path


@pytest.fixture
def weights_file(tmp_path) -> Path:
    path = tmp_path / "src" / "weights.pth"
    path.parent.mkdir()
    torch.save(vit_state(768), path)
    return path


# Objects used to write "pickles that need code". Defined at module level so torch.save can
# pickle them by reference, like a training script's own classes.
CODE_RAN: list[str] = []


def _record_execution(tag: str) -> str:
    CODE_RAN.append(tag)
    return tag


class Exploit:
    """Unpickling this calls a function: exactly what weights_only=True must refuse."""

    def __reduce__(self):
        return (_record_execution, ("unpickled",))


class TrainerState:
    def __init__(self) -> None:
        self.weight = torch.zeros(2)


# --------------------------------------------------------------------------------------------
# Registry and locations
# --------------------------------------------------------------------------------------------


def test_registry_entries_are_well_formed():
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam", "vit_b_lm",
            "vit_b_em_organelles"} <= set(REGISTRY)
    filenames = [info.filename for info in REGISTRY.values()]
    assert len(set(filenames)) == len(filenames), "two entries would share one cache file"
    for name, info in REGISTRY.items():
        assert info.name == name
        if info.bundled:  # shipped in the package: nothing to download, always hashed
            assert info.model_type == "segany_lite" and not info.url and not info.downloadable
            assert re.fullmatch(r"[0-9a-f]{64}", info.sha256) and info.size > 1_000_000
            continue
        assert info.model_type in ck.MODEL_TYPES
        assert info.url.startswith("https://")
        assert info.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", info.sha256)
        assert info.size is None or info.size > 1_000_000


def test_registry_matches_the_published_reference_values():
    vit_b = REGISTRY["sam_vit_b"]
    assert vit_b.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert vit_b.size == 375_042_383
    assert vit_b.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    mobile = REGISTRY["mobile_sam"]
    assert (mobile.model_type, mobile.size) == ("vit_t", 40_728_226)
    assert mobile.sha256 == "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
    # micro-sam publishes no sha256/size: they must be unknown, not invented.
    assert REGISTRY["vit_b_lm"].sha256 is None and REGISTRY["vit_b_lm"].size is None


def test_info_is_frozen():
    with pytest.raises(AttributeError):
        REGISTRY["sam_vit_b"].sha256 = "0" * 64  # type: ignore[misc]


def test_segany_home_from_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "x"))
    assert segany_home() == tmp_path / "x"
    monkeypatch.delenv("SEGANY_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert segany_home() == tmp_path / "user" / ".cache" / "segany"


def test_checkpoint_path_is_in_the_checkpoints_folder(home):
    assert checkpoint_path("sam_vit_h") == home / "checkpoints" / "sam_vit_h_4b8939.pth"


def test_unknown_name_lists_the_known_names(home):
    with pytest.raises(CheckpointError) as err:
        checkpoint_path("sam_vit_x")
    message = str(err.value)
    assert "unknown checkpoint 'sam_vit_x'" in message
    for name in REGISTRY:
        assert name in message
    assert isinstance(err.value, SegAnyError) and isinstance(err.value, ValueError)


# --------------------------------------------------------------------------------------------
# load_state_dict: every way a file can be wrong
# --------------------------------------------------------------------------------------------


def test_load_plain_state_dict(weights_file):
    state = load_state_dict(weights_file)
    assert same_tensors(state, vit_state(768))
    assert all(t.device.type == "cpu" for t in state.values())


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


def test_load_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_state_dict(tmp_path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.99])
def test_load_truncated_zip(tmp_path, weights_file, keep):
    data = weights_file.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_state_dict(path)
    assert str(path) in str(err.value) and "zip archive is cut short" in str(err.value)


def test_load_truncated_legacy_format(tmp_path):
    full = tmp_path / "legacy.pth"
    torch.save(vit_state(768), full, _use_new_zipfile_serialization=False)
    assert same_tensors(load_state_dict(full), vit_state(768))  # the whole file is fine
    cut = tmp_path / "legacy_cut.pth"
    cut.write_bytes(full.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_state_dict(cut)
    assert str(cut) in str(err.value)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"this is not a checkpoint\n", "a text file"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
        (b'{"error": "quota exceeded"}', "JSON"),
    ],
)
def test_load_non_checkpoint_files(tmp_path, content, kind):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert str(path) in message and "not a PyTorch checkpoint" in message and kind in message


def test_load_refuses_pickles_that_need_code(tmp_path):
    path = tmp_path / "trainer.pth"
    torch.save({"model": TrainerState(), "epoch": 3}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert str(path) in message
    assert "refuses to unpickle code" in message
    assert "TrainerState" in message  # names what it would have had to import
    assert "weights_only=False" in message and "torch.save" in message  # how to convert


def test_the_suggested_conversion_works(tmp_path):
    # A whole nn.Module pickled by a training script: refused, and the printed one-liner
    # (run here on our own trusted file) turns it into a plain state dict that loads.
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    path = tmp_path / "whole_model.pth"
    torch.save({"model": model, "epoch": 1}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "\n" not in message  # the CLI prints errors on one line
    code = re.search(r'python -c "(.*)" and use (\S+)\.$', message)
    assert code is not None, message
    exec(code.group(1), {})
    converted = load_state_dict(code.group(2))
    assert same_tensors(converted, model.state_dict())


def test_load_never_runs_code_from_the_file(tmp_path):
    path = tmp_path / "exploit.pth"
    torch.save({"w": torch.zeros(1), "payload": Exploit()}, path)
    CODE_RAN.clear()
    with pytest.raises(CheckpointError, match="refuses to unpickle code"):
        load_state_dict(path)
    assert CODE_RAN == []


def test_load_dict_without_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "name": "run", "opts": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="holds no tensors") as err:
        load_state_dict(path)
    message = str(err.value)
    assert str(path) in message and "'epoch'" in message and "'opts'" in message


def test_load_object_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_state_dict(path)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 7},
        lambda sd: {"state_dict": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model_state_dict": sd},
        lambda sd: {"state_dict": {"model": sd}},  # nested wrappers
        # micro-sam / torch-em trainer layout: "sam." on every key, a decoder beside it
        lambda sd: {
            "model_state": {f"sam.{k}": v for k, v in sd.items()},
            "decoder_state": {"base.0.weight": torch.zeros(2)},
            "iteration": 100,
        },
    ],
    ids=["model", "state_dict", "model_state_dict", "nested", "micro_sam"],
)
def test_load_unwraps_wrapped_state_dicts(tmp_path, wrap):
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(vit_state(768)), path)
    assert same_tensors(load_state_dict(path), vit_state(768))


@pytest.mark.parametrize("prefix", ["module.", "sam.", "_orig_mod.", "model.", "module.sam.", "net."])
def test_load_strips_common_prefixes(tmp_path, prefix):
    path = tmp_path / "prefixed.pth"
    torch.save(vit_state(768, prefix=prefix), path)
    assert same_tensors(load_state_dict(path), vit_state(768))


def test_load_keeps_keys_that_only_some_entries_share(tmp_path):
    # A prefix on some keys only is part of the names, not a wrapper artefact.
    state = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    assert set(load_state_dict(path)) == {"module.a", "b"}


def test_load_drops_non_tensor_metadata_beside_weights(tmp_path):
    path = tmp_path / "meta_and_weights.pth"
    torch.save({**vit_state(768), "version": 2, "note": "x"}, path)
    assert same_tensors(load_state_dict(path), vit_state(768))


def test_load_with_wrong_model_type(tmp_path):
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(vit_state(1024), path)
    assert guess_model_type(load_state_dict(path, model_type="vit_l")) == "vit_l"
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path, model_type="vit_b")
    assert str(err.value) == "sam_vit_l_0b3195.pth is a vit_l checkpoint but a vit_b model was requested"


# --------------------------------------------------------------------------------------------
# guess_model_type / check_state_dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "expected"), [(768, "vit_b"), (1024, "vit_l"), (1280, "vit_h")])
def test_guess_vit_types_by_width(width, expected):
    assert guess_model_type(vit_state(width)) == expected


def test_guess_custom_vit_is_none_and_described():
    state = vit_state(512, depth=6)
    assert guess_model_type(state) is None
    assert describe_state_dict(state) == "a ViT encoder of width 512 and depth 6"


def test_guess_width_with_wrong_depth_is_custom():
    assert guess_model_type(vit_state(768, depth=12)) == "vit_b"
    assert guess_model_type(vit_state(768, depth=13)) is None  # not the official vit_b


def test_guess_tiny_vit():
    from segany.build import build_sam

    with torch.device("meta"):
        mobile_sam = build_sam("vit_t").state_dict()
    assert guess_model_type(mobile_sam) == "vit_t"
    # Another TinyViT (a user's wider or deeper one) is not MobileSAM's vit_t.
    state = {
        "image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3),
        "image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(64, 64, 1, 1),
        "image_encoder.layers.2.blocks.0.attn.qkv.weight": torch.zeros(480, 160),
        "image_encoder.norm_head.weight": torch.zeros(320),
        "mask_decoder.iou_token.weight": torch.zeros(1, 256),
    }
    assert guess_model_type(state) is None  # 1 block in stage 3, not 6
    assert guess_model_type({"mask_decoder.iou_token.weight": torch.zeros(1)}) is None
    assert describe_state_dict({"x": torch.zeros(1)}) == "no SAM image encoder"


def test_check_state_dict_wrong_type_with_synthetic_width():
    model_state = vit_state(768)
    file_state = vit_state(1024)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model_state, file_state, "sam_vit_l_0b3195.pth", "vit_b")
    assert str(err.value) == "sam_vit_l_0b3195.pth is a vit_l checkpoint but a vit_b model was requested"
    # Without an explicit type, the model's own type is recognised.
    with pytest.raises(CheckpointError, match="is a vit_l checkpoint but a vit_b model"):
        check_state_dict(model_state, file_state, "sam_vit_l_0b3195.pth", None)


def test_check_state_dict_lists_the_differences():
    model_state = vit_state(512, depth=6)
    for i in range(4):
        model_state[f"image_encoder.neck.extra{i}.weight"] = torch.zeros(3)
    file_state = vit_state(640, depth=6)
    file_state["mask_decoder.extra.bias"] = torch.zeros(1)
    file_state["mask_decoder.extra2.bias"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model_state, file_state, "custom.pth", "my_type")
    message = str(err.value)
    assert message.startswith(
        "custom.pth (a ViT encoder of width 640 and depth 6) does not fit the my_type model: "
    )
    assert "missing 4 keys (image_encoder.neck.extra0.weight, image_encoder.neck.extra1.weight, " \
           "image_encoder.neck.extra2.weight and 1 more)" in message
    assert "2 unexpected keys (mask_decoder.extra.bias, mask_decoder.extra2.bias)" in message
    # 3 patch/pos/neck tensors + 6 norms differ in width: two shown, the rest counted.
    assert "9 shape mismatches (image_encoder.patch_embed.proj.weight: file 640x3x1x1, model " \
           "512x3x1x1, image_encoder.pos_embed: file 1x4x4x640, model 1x4x4x512 and 7 more)" in message


def test_check_state_dict_accepts_a_module_without_its_non_persistent_buffers():
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(2, 3)
            self.register_buffer("pixel_mean", torch.zeros(3), persistent=False)

    model = Tiny()
    file_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "pixel_mean" not in file_state
    check_state_dict(model, file_state, "tiny.pth")  # no error
    del file_state["proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 key \(proj\.bias\)"):
        check_state_dict(model, file_state, "tiny.pth")


def test_check_state_dict_tolerances():
    model_state = {"bn.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}
    # A BatchNorm step counter absent from a file is not a missing weight.
    check_state_dict(model_state, {"bn.weight": torch.zeros(2)}, "f.pth")
    # MobileSAM's unused classifier head is ignored for vit_t, and by explicit prefix.
    tiny = {"image_encoder.layers.0.x": torch.zeros(1)}
    check_state_dict(tiny, {**tiny, "image_encoder.head.weight": torch.zeros(1)}, "m.pt", "vit_t")
    check_state_dict(model_state, {"bn.weight": torch.zeros(2), "aux.w": torch.zeros(1)},
                     "f.pth", ignore=("aux.",))
    with pytest.raises(CheckpointError, match="1 unexpected key"):
        check_state_dict(model_state, {"bn.weight": torch.zeros(2), "aux.w": torch.zeros(1)}, "f.pth")


# --------------------------------------------------------------------------------------------
# list_checkpoints / verify
# --------------------------------------------------------------------------------------------


def place(name: str, source: Path) -> Path:
    dest = checkpoint_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(source.read_bytes())
    return dest


def status_of(name: str) -> str:
    return dict((info.name, status) for info, status in list_checkpoints())[name]


def test_statuses_missing_present_verified(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    assert status_of("local") == STATUS_MISSING
    assert verify("local") == STATUS_MISSING
    place("local", weights_file)
    assert status_of("local") == STATUS_PRESENT  # listing never hashes
    assert verify("local") == STATUS_VERIFIED
    assert status_of("local") == STATUS_VERIFIED  # remembered


def test_verify_reports_wrong_size(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    dest = place("local", weights_file)
    dest.write_bytes(dest.read_bytes()[:1000])
    expected = f"size is 1,000 bytes, expected {weights_file.stat().st_size:,}"
    assert status_of("local").startswith("corrupt: ")
    assert expected in status_of("local")  # size is checked even when only listing
    status = verify("local")
    assert status.startswith("corrupt: ") and "incomplete" in status


def test_verify_reports_wrong_hash_of_same_size(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    dest = place("local", weights_file)
    data = bytearray(dest.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    dest.write_bytes(bytes(data))
    status = verify("local")
    assert status.startswith("corrupt: sha256 is ")
    assert sha256_of(weights_file) in status


def test_verify_caches_by_size_and_mtime(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    dest = place("local", weights_file)
    calls = []
    real = ck._digest_file
    monkeypatch.setattr(ck, "_digest_file", lambda *a, **k: calls.append(1) or real(*a, **k))

    assert verify("local") == STATUS_VERIFIED and len(calls) == 1
    assert verify("local") == STATUS_VERIFIED and len(calls) == 1  # from the sidecar
    list_checkpoints()
    assert len(calls) == 1
    sidecar = dest.with_name(f".{dest.name}.verified.json")
    record = json.loads(sidecar.read_text())
    assert record["status"] == STATUS_VERIFIED and record["sha256"] == sha256_of(weights_file)

    assert verify("local", force=True) == STATUS_VERIFIED and len(calls) == 2
    stat = dest.stat()
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # file "changed"
    assert status_of("local") == STATUS_PRESENT
    assert verify("local") == STATUS_VERIFIED and len(calls) == 3


def test_verify_cache_is_invalidated_when_the_expected_hash_changes(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    place("local", weights_file)
    assert verify("local") == STATUS_VERIFIED
    register(monkeypatch, "local", weights_file, sha256="0" * 64)
    assert status_of("local") == STATUS_PRESENT
    assert verify("local").startswith("corrupt: sha256")


def test_verify_without_published_hash_checks_that_it_loads(home, monkeypatch, weights_file, tmp_path):
    register(monkeypatch, "nohash", weights_file, size=None, sha256=None)
    place("nohash", weights_file)
    assert verify("nohash") == STATUS_LOADS == "size/hash unknown, checked that it loads"
    # The same unhashed entry, holding a vit_l file instead of the promised vit_b:
    vit_l = tmp_path / "vit_l.pth"
    torch.save(vit_state(1024), vit_l)
    place("nohash", vit_l)
    status = verify("nohash")
    assert status.startswith("corrupt: ") and "is a vit_l checkpoint but a vit_b model" in status


def test_verify_uses_published_xxh128_when_xxhash_is_available(home, monkeypatch, weights_file):
    # A stand-in for the optional xxhash package (hashlib's blake2b with a 16-byte digest).
    fake = types.ModuleType("xxhash")
    fake.xxh128 = lambda: hashlib.blake2b(digest_size=16)
    monkeypatch.setitem(sys.modules, "xxhash", fake)
    good = hashlib.blake2b(weights_file.read_bytes(), digest_size=16).hexdigest()
    info = register(monkeypatch, "micro", weights_file, size=None, sha256=None)
    monkeypatch.setitem(REGISTRY, "micro", CheckpointInfo(**{**info.__dict__, "xxh128": good}))
    place("micro", weights_file)
    assert verify("micro") == STATUS_VERIFIED
    monkeypatch.setitem(REGISTRY, "micro", CheckpointInfo(**{**info.__dict__, "xxh128": "0" * 32}))
    assert verify("micro").startswith("corrupt: xxh128 is ")


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def folder_listing(home: Path) -> list[str]:
    folder = home / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_downloads_verifies_and_caches(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    path = fetch("local", progress=False)
    assert path == home / "checkpoints" / "local.pth"
    assert path.read_bytes() == weights_file.read_bytes()
    assert folder_listing(home) == [".local.pth.verified.json", "local.pth"]  # no .part left
    assert status_of("local") == STATUS_VERIFIED

    # Present and verified: returns at once, without touching the network.
    def no_network(*args, **kwargs):
        raise AssertionError("fetch went to the network for a verified file")

    monkeypatch.setattr(ck.urllib.request, "urlopen", no_network)
    assert fetch("local", progress=False) == path


def test_fetch_hash_mismatch_leaves_nothing_behind(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file, sha256="ab" * 32)
    with pytest.raises(CheckpointError) as err:
        fetch("local", progress=False)
    message = str(err.value)
    assert "has sha256 " + sha256_of(weights_file) in message and "expected " + "ab" * 32 in message
    assert not checkpoint_path("local").exists()
    assert folder_listing(home) == []  # the temporary file was removed too


def test_fetch_size_mismatch_leaves_nothing_behind(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file, size=weights_file.stat().st_size + 1)
    with pytest.raises(CheckpointError, match="wrong size"):
        fetch("local", progress=False)
    assert folder_listing(home) == []


def test_fetch_offline_says_url_and_where_to_put_the_file(home, monkeypatch, weights_file):
    url = f"http://127.0.0.1:{closed_port()}/sam_vit_b_01ec64.pth"
    register(monkeypatch, "local", weights_file, url=url)
    with pytest.raises(CheckpointError) as err:
        fetch("local", progress=False)
    message = str(err.value)
    assert url in message
    assert str(home / "checkpoints" / "local.pth") in message
    assert "segany models" in message
    assert folder_listing(home) == []


@pytest.fixture
def http_server():
    """A local HTTP server; ``serve(body, claimed_length)`` returns a URL for one file."""
    import http.server
    import threading

    files: dict[str, tuple[bytes, int]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path not in files:
                self.send_error(404)
                return
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)  # may be shorter than announced: a dropped connection
            self.close_connection = True

        def log_message(self, *args):  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()

    def serve(body: bytes, claimed_length: int | None = None) -> str:
        name = f"/file{len(files)}.pth"
        files[name] = (body, len(body) if claimed_length is None else claimed_length)
        return f"http://127.0.0.1:{server.server_address[1]}{name}"

    yield serve
    server.shutdown()
    server.server_close()


def test_fetch_over_http(home, monkeypatch, weights_file, http_server):
    data = weights_file.read_bytes()
    register(monkeypatch, "local", weights_file, url=http_server(data))
    assert fetch("local", progress=False).read_bytes() == data

    register(monkeypatch, "cut", weights_file, url=http_server(data[:1000], len(data)))
    with pytest.raises(CheckpointError, match="could not download checkpoint 'cut'"):
        fetch("cut", progress=False)
    register(monkeypatch, "gone", weights_file, url=http_server(data)[:-5] + "x.pth")
    with pytest.raises(CheckpointError, match="Not Found"):
        fetch("gone", progress=False)
    assert folder_listing(home) == [".local.pth.verified.json", "local.pth"]


def test_fetch_http_error_is_a_checkpoint_error(home, monkeypatch, weights_file, tmp_path):
    register(monkeypatch, "local", weights_file, url=(tmp_path / "absent.pth").as_uri())
    with pytest.raises(CheckpointError, match="could not download checkpoint 'local'"):
        fetch("local", progress=False)
    assert folder_listing(home) == []


def test_fetch_unknown_name(home):
    with pytest.raises(CheckpointError, match="unknown checkpoint 'nope'.*sam_vit_b"):
        fetch("nope", progress=False)


def test_fetch_replaces_a_corrupt_file_and_force_downloads_again(home, monkeypatch, weights_file):
    register(monkeypatch, "local", weights_file)
    dest = checkpoint_path("local")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"half a download")
    assert fetch("local", progress=False).read_bytes() == weights_file.read_bytes()

    calls = []
    real = ck._download
    monkeypatch.setattr(ck, "_download", lambda *a, **k: calls.append(1) or real(*a, **k))
    fetch("local", progress=False)
    assert calls == []
    fetch("local", progress=False, force=True)
    assert calls == [1]


def test_fetch_without_published_hash_checks_the_download_loads(home, monkeypatch, tmp_path, weights_file):
    register(monkeypatch, "nohash", weights_file, size=None, sha256=None)
    assert fetch("nohash", progress=False).exists()
    assert status_of("nohash") == STATUS_LOADS

    page = tmp_path / "error.html"
    page.write_text("<html>Service unavailable</html>")
    register(monkeypatch, "page", page, size=None, sha256=None)
    with pytest.raises(CheckpointError, match="not a usable checkpoint.*HTML"):
        fetch("page", progress=False)
    assert not checkpoint_path("page").exists()
    assert not any(name.endswith(".part") for name in folder_listing(home))


# --------------------------------------------------------------------------------------------
# resolve_checkpoint
# --------------------------------------------------------------------------------------------


def test_resolve_registry_name(home, monkeypatch, weights_file):
    info = register(monkeypatch, "local", weights_file)
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("local")
    message = str(err.value)
    assert "`segany fetch local`" in message and str(checkpoint_path("local")) in message
    assert info.url in message
    place("local", weights_file)
    assert resolve_checkpoint("local") == (checkpoint_path("local"), "vit_b", info)


def test_resolve_file_path(weights_file):
    assert resolve_checkpoint(weights_file) == (weights_file, None, None)
    assert resolve_checkpoint(str(weights_file)) == (weights_file, None, None)


def test_resolve_errors(home, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("sam_vit_bb")
    message = str(err.value)
    assert "neither an existing file nor a known checkpoint name" in message
    assert "Did you mean 'sam_vit_b'?" in message
