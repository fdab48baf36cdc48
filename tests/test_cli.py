"""Tests for the ``segany`` command line (models, fetch, --version, error handling).

No network: registry entries point at local files through file:// URLs (monkeypatch), the
offline case at a closed port on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path

import pytest
import torch

try:
    import segany.cli  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from segany import cli
from segany.checkpoints import REGISTRY, CheckpointInfo, checkpoint_path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "segany-home"
    monkeypatch.setenv("SEGANY_HOME", str(path))
    return path


@pytest.fixture
def local_entry(tmp_path, monkeypatch) -> CheckpointInfo:
    """Replace the 'mobile_sam' entry by a small local file with its real size and sha256."""
    source = tmp_path / "src" / "tiny.pt"
    source.parent.mkdir()
    torch.save({"image_encoder.layers.0.w": torch.arange(10.0)}, source)
    info = CheckpointInfo(
        name="mobile_sam",
        model_type="vit_t",
        url=source.as_uri(),
        filename="mobile_sam.pt",
        size=source.stat().st_size,
        sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        description="test",
        license="test",
        source="tests",
    )
    monkeypatch.setitem(REGISTRY, "mobile_sam", info)
    return info


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, str]:
    """name -> the rest of its table line."""
    rows = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=1)
        if parts and parts[0] in REGISTRY:
            rows[parts[0]] = parts[1]
    return rows


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0
    assert out.startswith("segany ") and out.strip() != "segany"


def test_models_shows_every_checkpoint_and_its_status(home, capsys, local_entry):
    # sam_vit_b: a 10-byte "download" -> corrupt (size); mobile_sam: intact copy; rest missing.
    broken = checkpoint_path("sam_vit_b")
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"0123456789")
    good = checkpoint_path("mobile_sam")
    good.write_bytes(Path(local_entry.url.removeprefix("file://")).read_bytes())

    code, out, err = run(capsys, "models")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[:3] == ["name", "model", "type"] and "status" in header and "path" in header
    rows = table_rows(out)
    assert set(rows) == set(REGISTRY)
    assert "corrupt: size is 10 bytes, expected 375,042,383" in rows["sam_vit_b"]
    assert "vit_b" in rows["sam_vit_b"] and "375.0 MB" in rows["sam_vit_b"]
    assert "present (not verified)" in rows["mobile_sam"] and str(good) in rows["mobile_sam"]
    assert "missing" in rows["sam_vit_h"] and str(checkpoint_path("sam_vit_h")) in rows["sam_vit_h"]
    assert "unknown" in rows["vit_b_lm"]  # micro-sam publishes no size
    assert str(home / "checkpoints") in out

    code, out, err = run(capsys, "models", "--verify", "--quiet")
    assert code == 0, err
    rows = table_rows(out)
    assert " verified " in rows["mobile_sam"] and "not verified" not in rows["mobile_sam"]
    assert "corrupt: size is 10 bytes" in rows["sam_vit_b"]
    # The verified result is remembered for plain listings.
    code, out, err = run(capsys, "models")
    assert " verified " in table_rows(out)["mobile_sam"]


def test_fetch_unknown_name_exits_2_with_one_clear_line(home, capsys):
    code, out, err = run(capsys, "fetch", "sam_vit_bb")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("segany: error: unknown checkpoint 'sam_vit_bb'")
    assert "Did you mean 'sam_vit_b'?" in lines[0]
    for name in REGISTRY:
        assert name in lines[0]
    assert "Traceback" not in err


def test_fetch_success(home, capsys, local_entry):
    code, out, err = run(capsys, "fetch", "mobile_sam", "--quiet")
    assert code == 0, err
    dest = checkpoint_path("mobile_sam")
    assert dest.is_file() and out.strip() == f"mobile_sam: verified: {dest}"
    # A second fetch finds the verified file; --force downloads again and still succeeds.
    assert run(capsys, "fetch", "mobile_sam", "-q")[0] == 0
    assert run(capsys, "fetch", "mobile_sam", "-q", "--force")[0] == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == [".mobile_sam.pt.verified.json", "mobile_sam.pt"]


def test_fetch_offline_exits_2_with_url_and_destination(home, capsys, local_entry, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mobile_sam.pt"
    monkeypatch.setitem(REGISTRY, "mobile_sam", CheckpointInfo(**{**local_entry.__dict__, "url": url}))
    code, out, err = run(capsys, "fetch", "mobile_sam", "-q")
    assert code == 2
    assert err.startswith("segany: error: could not download checkpoint 'mobile_sam'")
    assert url in err and str(checkpoint_path("mobile_sam")) in err and "segany models" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fetch_hash_mismatch_exits_2(home, capsys, local_entry, monkeypatch):
    wrong = CheckpointInfo(**{**local_entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(REGISTRY, "mobile_sam", wrong)
    code, out, err = run(capsys, "fetch", "mobile_sam", "-q")
    assert code == 2 and "expected " + "0" * 64 in err
    assert not checkpoint_path("mobile_sam").exists()


def test_usage_errors_exit_2_on_one_line(capsys):
    code, out, err = run(capsys, "fetch")
    assert code == 2 and err.startswith("segany: error: ") and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err
    code, out, err = run(capsys)
    assert code == 2 and "models" in err and "fetch" in err  # help listing the commands


def test_help_exits_0(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "models" in out and "fetch" in out


def test_add_command_registers_a_subcommand(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))
    seen = []

    @cli.add_command
    def register_echo(subparsers):
        parser = subparsers.add_parser("echo", help="test command")
        parser.add_argument("word")
        parser.set_defaults(func=lambda args: seen.append(args.word) or 0)

    assert cli.add_command(register_echo) is register_echo  # idempotent
    assert cli.COMMANDS.count(register_echo) == 1
    assert run(capsys, "echo", "hi")[0] == 0 and seen == ["hi"]


def test_segany_errors_from_any_command_print_one_line(capsys, monkeypatch):
    from segany.errors import ImageError

    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))

    def boom(args):
        raise ImageError("image.tif has 0 pixels")

    cli.add_command(lambda sp: sp.add_parser("boom").set_defaults(func=boom))
    code, out, err = run(capsys, "boom")
    assert (code, err) == (2, "segany: error: image.tif has 0 pixels\n")
