"""Known SAM checkpoints: where they come from, where they live, and how to load them safely.

Everything a user can get wrong about a weights file ends here as a :class:`CheckpointError`
that names the file and says what to do: a missing or half-downloaded file, an HTML error
page saved under a ``.pth`` name, a pickle that would run code, a ViT-L file handed to a
ViT-B model.

The cache lives in ``$SEGANY_HOME/checkpoints`` (default ``~/.cache/segany/checkpoints``).
A machine without internet access gets the file by hand: ``fetch`` fails with the URL and the
exact path to copy it to, and ``segany models`` then checks it.

Example:
    >>> from segany.checkpoints import REGISTRY, checkpoint_path
    >>> REGISTRY["sam_vit_b"].model_type
    'vit_b'
    >>> checkpoint_path("sam_vit_b").name
    'sam_vit_b_01ec64.pth'
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .errors import CheckpointError

__all__ = [
    "CheckpointInfo",
    "REGISTRY",
    "MODEL_TYPES",
    "STATUS_MISSING",
    "STATUS_PRESENT",
    "STATUS_VERIFIED",
    "STATUS_LOADS",
    "segany_home",
    "checkpoint_path",
    "get_info",
    "list_checkpoints",
    "verify",
    "fetch",
    "load_state_dict",
    "guess_model_type",
    "describe_state_dict",
    "check_state_dict",
    "resolve_checkpoint",
    "is_usable",
    "DEFAULT_MODEL",
    "bundled_path",
    "bundled_weights_dir",
]

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "vit_t")

#: The model ``segany.load_model()`` returns when none is named: shipped in the package.
DEFAULT_MODEL = "segany_lite"
# Written by tools/train_default_model.py export (fp16 state dict in segany/weights/).
BUNDLED_SIZE: int | None = 12265773
BUNDLED_SHA256: str | None = "67e964294062d5b6c3d80107499df1e99f696662b6c91633c429cf3aa3cf277c"

# Status strings shown by `segany models`. "corrupt: <reason>" is built on the fly.
STATUS_MISSING = "missing"
STATUS_PRESENT = "present (not verified)"
STATUS_VERIFIED = "verified"
# For files whose publisher gives neither a byte size nor a sha256 (the micro-sam models),
# we cannot prove the bytes are the published ones; the best honest check is that the file
# loads as a state dict of the expected architecture.
STATUS_LOADS = "size/hash unknown, checked that it loads"

_CHUNK = 8 * 1024 * 1024  # hashing/downloading block: large enough to be fast, small in memory
_TIMEOUT_S = 30.0  # per socket operation, so a dead network fails in seconds, not minutes


@dataclass(frozen=True)
class CheckpointInfo:
    """One downloadable checkpoint.

    ``size`` (bytes) and ``sha256`` are ``None`` where the publisher does not state them; they
    are never guessed. ``bundled`` entries ship inside the package (``segany/weights/``):
    segany's own default model, usable offline. ``xxh128`` is the hash micro-sam publishes for its own files (it only
    publishes xxh128); segany checks it when the optional ``xxhash`` package is installed.

    Example:
        >>> info = REGISTRY["mobile_sam"]
        >>> (info.model_type, info.filename, info.size)
        ('vit_t', 'mobile_sam.pt', 40728226)
    """

    name: str
    model_type: str
    url: str
    filename: str
    size: int | None
    sha256: str | None
    description: str
    license: str
    source: str
    xxh128: str | None = None
    bundled: bool = False

    @property
    def downloadable(self) -> bool:
        """False for weights that ship inside the segany package (nothing to download)."""
        return not self.bundled


def _entries() -> dict[str, CheckpointInfo]:
    fb = "https://dl.fbaipublicfiles.com/segment_anything/"
    bioimage = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"
    entries = [
        CheckpointInfo(
            name=DEFAULT_MODEL,
            model_type="segany_lite",
            url="",
            filename="segany_lite.pt",
            size=BUNDLED_SIZE,
            sha256=BUNDLED_SHA256,
            description="segany's own small model, shipped with segany (ConvNeXt encoder + SAM decoder, 6 M parameters; docs/model-card.md)",
            license="CC-BY-4.0 (weights; training data attribution in docs/model-card.md, incl. (c) OpenStreetMap contributors)",
            source="segany (tools/train_default_model.py)",
            bundled=True,
        ),
        CheckpointInfo(
            name="sam_vit_b",
            model_type="vit_b",
            url=fb + "sam_vit_b_01ec64.pth",
            filename="sam_vit_b_01ec64.pth",
            size=375_042_383,
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            description="Segment Anything ViT-B (official, 94 M parameters)",
            license="Apache-2.0",
            source="facebookresearch/segment-anything",
        ),
        CheckpointInfo(
            name="sam_vit_l",
            model_type="vit_l",
            url=fb + "sam_vit_l_0b3195.pth",
            filename="sam_vit_l_0b3195.pth",
            size=1_249_524_736,
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            description="Segment Anything ViT-L (official, 312 M parameters)",
            license="Apache-2.0",
            source="facebookresearch/segment-anything",
        ),
        CheckpointInfo(
            name="sam_vit_h",
            model_type="vit_h",
            url=fb + "sam_vit_h_4b8939.pth",
            filename="sam_vit_h_4b8939.pth",
            size=2_564_550_879,
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            description="Segment Anything ViT-H (official, 641 M parameters)",
            license="Apache-2.0",
            source="facebookresearch/segment-anything",
        ),
        CheckpointInfo(
            name="mobile_sam",
            model_type="vit_t",
            url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            filename="mobile_sam.pt",
            size=40_728_226,
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            description="MobileSAM: TinyViT encoder distilled from SAM ViT-H (10 M parameters)",
            license="Apache-2.0",
            source="ChaoningZhang/MobileSAM",
        ),
        # micro-sam's fine-tuned models. Both upstream files are called "vit_b.pt", so the
        # local names must differ. micro-sam publishes only xxh128 hashes and no byte sizes.
        CheckpointInfo(
            name="vit_b_lm",
            model_type="vit_b",
            url=bioimage + "diplomatic-bug/1.2/files/vit_b.pt",
            filename="micro_sam_vit_b_lm.pt",
            size=None,
            sha256=None,
            description="micro-sam ViT-B fine-tuned for light microscopy (cells, nuclei)",
            license="CC-BY-4.0",
            source="computational-cell-analytics/micro-sam (BioImage.IO diplomatic-bug 1.2)",
            xxh128="fe9252a29f3f4ea53c15a06de471e186",
        ),
        CheckpointInfo(
            name="vit_b_em_organelles",
            model_type="vit_b",
            url=bioimage + "noisy-ox/1.2/files/vit_b.pt",
            filename="micro_sam_vit_b_em_organelles.pt",
            size=None,
            sha256=None,
            description="micro-sam ViT-B fine-tuned for electron microscopy organelles",
            license="CC-BY-4.0",
            source="computational-cell-analytics/micro-sam (BioImage.IO noisy-ox 1.2)",
            xxh128="f3bf2ed83d691456bae2c3f9a05fb438",
        ),
    ]
    return {entry.name: entry for entry in entries}


#: Every checkpoint segany knows by name.
REGISTRY: dict[str, CheckpointInfo] = _entries()


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def segany_home() -> Path:
    """Return segany's cache folder: ``$SEGANY_HOME`` if set, else ``~/.cache/segany``.

    Read on every call (not at import) so that tests and users can change it at run time.

    Example:
        >>> import os
        >>> os.environ["SEGANY_HOME"] = "/data/segany"
        >>> str(segany_home())
        '/data/segany'
    """
    value = os.environ.get("SEGANY_HOME", "").strip()
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "segany"


def get_info(name: str) -> CheckpointInfo:
    """Return the registry entry for ``name``; an unknown name lists the known ones.

    Example:
        >>> get_info("sam_vit_h").filename
        'sam_vit_h_4b8939.pth'
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise CheckpointError(_unknown_name_message(str(name))) from None


def checkpoint_path(name: str) -> Path:
    """Return where checkpoint ``name`` is (or would be) stored: ``<home>/checkpoints/<file>``.

    Bundled weights live in the package itself (``segany/weights/``).

    Example:
        >>> checkpoint_path("mobile_sam").parent.name
        'checkpoints'
        >>> checkpoint_path("segany_lite").parent.name
        'weights'
    """
    info = get_info(name)
    if info.bundled:
        return bundled_weights_dir() / info.filename
    return segany_home() / "checkpoints" / info.filename


def bundled_path(name: str = DEFAULT_MODEL) -> Path:
    """The verified file of a bundled model; a clear error if the installation lost it.

    Example:
        >>> bundled_path().name
        'segany_lite.pt'
    """
    info = get_info(name)
    path = checkpoint_path(name)
    status = verify(name)
    if not is_usable(status):
        state = "is missing" if status == STATUS_MISSING else f"is {status}"
        raise CheckpointError(
            f"segany's shipped model file {path} {state}: the installation is incomplete or "
            "damaged; reinstall segany (pip install --force-reinstall segany)"
        )
    return path


def bundled_weights_dir() -> Path:
    """The folder of the weights shipped inside the package."""
    return Path(__file__).resolve().parent / "weights"


def _known_names_hint(name: str) -> str:
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f"Did you mean '{close[0]}'? " if close else ""
    return f"{hint}Known checkpoints: {', '.join(REGISTRY)}."


def _unknown_name_message(name: str) -> str:
    return f"unknown checkpoint '{name}'. {_known_names_hint(name)}"


# --------------------------------------------------------------------------------------------
# Status and verification
# --------------------------------------------------------------------------------------------


def is_usable(status: str) -> bool:
    """True for statuses that mean "this file can be used" (verified, or loads when unhashed).

    Example:
        >>> is_usable("verified"), is_usable("corrupt: size is 10 bytes")
        (True, False)
    """
    return status in (STATUS_VERIFIED, STATUS_LOADS)


def _sidecar(path: Path) -> Path:
    # One small hidden JSON file per checkpoint: no shared file to corrupt when two processes
    # verify different checkpoints at once.
    return path.with_name(f".{path.name}.verified.json")


def _expected_key(info: CheckpointInfo) -> str:
    # If the registry entry changes (a new hash), old verification results must not count.
    return f"{info.size}|{info.sha256}|{info.xxh128}"


def _cached_status(path: Path, info: CheckpointInfo) -> str | None:
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    # Keyed by size and modification time: a replaced or rewritten file gets hashed again.
    if (
        record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
        and record.get("expected") == _expected_key(info)
        and isinstance(record.get("status"), str)
    ):
        return record["status"]
    return None


def _write_sidecar(path: Path, info: CheckpointInfo, status: str, sha256: str | None) -> None:
    try:
        stat = path.stat()
        record = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "expected": _expected_key(info),
            "status": status,
            "sha256": sha256,
        }
        _sidecar(path).write_text(json.dumps(record, indent=1), encoding="utf-8")
    except OSError:
        # A read-only cache folder must not stop anyone from using a good checkpoint; it only
        # means the file is hashed again next time.
        pass


def _quick_status(info: CheckpointInfo) -> str:
    path = checkpoint_path(info.name)
    if not path.exists():
        return STATUS_MISSING
    if not path.is_file():
        return f"corrupt: {path} is not a regular file"
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        # Free to check, and the most common failure (an interrupted copy), so never hide it.
        return f"corrupt: {_size_reason(size, info.size)}"
    cached = _cached_status(path, info)
    return cached if cached is not None else STATUS_PRESENT


def _size_reason(actual: int, expected: int) -> str:
    what = "incomplete download or copy" if actual < expected else "a different file"
    return f"size is {actual:,} bytes, expected {expected:,} ({what})"


def list_checkpoints() -> list[tuple[CheckpointInfo, str]]:
    """Return every registry entry with its status, without hashing anything.

    A status is ``"missing"``, ``"present (not verified)"``, ``"verified"``,
    ``"size/hash unknown, checked that it loads"`` or ``"corrupt: <reason>"``. Earlier
    :func:`verify` results are reused while the file's size and modification time are unchanged.

    Example (needs the real checkpoint files)::

        for info, status in list_checkpoints():
            print(info.name, status)   # e.g. "sam_vit_b verified", "sam_vit_l missing"
    """
    return [(info, _quick_status(info)) for info in REGISTRY.values()]


def _xxhash_module() -> Any | None:
    try:
        import xxhash  # optional: only micro-sam's published hashes need it
    except ImportError:
        return None
    return xxhash


def _digest_file(path: Path, hasher: Any, progress: bool, label: str) -> str:
    from tqdm.auto import tqdm

    total = path.stat().st_size
    with open(path, "rb") as handle, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
        disable=not progress, leave=False,
    ) as bar:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


def _verify_file(path: Path, info: CheckpointInfo, progress: bool) -> tuple[str, str | None]:
    """Check ``path`` against ``info``: size first (free), then the strongest known hash."""
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        return f"corrupt: {_size_reason(size, info.size)}", None
    if info.sha256 is not None:
        digest = _digest_file(path, hashlib.sha256(), progress, f"sha256 {info.filename}")
        if digest != info.sha256:
            return (
                f"corrupt: sha256 is {digest}, expected {info.sha256} (damaged or a different "
                "file; delete it and fetch again)",
                digest,
            )
        return STATUS_VERIFIED, digest
    xxhash = _xxhash_module()
    if info.xxh128 is not None and xxhash is not None:
        digest = _digest_file(path, xxhash.xxh128(), progress, f"xxh128 {info.filename}")
        if digest != info.xxh128:
            return f"corrupt: xxh128 is {digest}, expected {info.xxh128}", None
        return STATUS_VERIFIED, None
    # Nothing published to compare with: prove at least that it is a loadable state dict of
    # the architecture the registry promises.
    try:
        load_state_dict(path, model_type=info.model_type)
    except CheckpointError as exc:
        return f"corrupt: {exc}", None
    return STATUS_LOADS, None


def verify(name: str, *, force: bool = False, progress: bool = False) -> str:
    """Verify checkpoint ``name`` in the cache and return its status.

    Checks the byte size, then the sha256 (streamed in chunks). A file without a published
    hash is loaded instead (status ``"size/hash unknown, checked that it loads"``). The result
    is remembered in a small JSON sidecar keyed by size and modification time, so a 2.5 GB file
    is hashed once, not at every listing; ``force=True`` hashes again.

    Example (needs the real checkpoint files)::

        verify("sam_vit_b")   # -> 'verified'
    """
    info = get_info(name)
    path = checkpoint_path(name)
    if not path.exists():
        return STATUS_MISSING
    if not path.is_file():
        return f"corrupt: {path} is not a regular file"
    if info.bundled:
        # Small, and inside the package (often read-only): hashed every time, no sidecar.
        return _verify_file(path, info, progress)[0]
    if not force:
        cached = _cached_status(path, info)
        if cached is not None:
            return cached
    status, digest = _verify_file(path, info, progress)
    _write_sidecar(path, info, status, digest)
    return status


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"segany/{version('segany')}"
    except Exception:  # not installed as a distribution (source checkout)
        return "segany"


def _offline_message(info: CheckpointInfo, dest: Path, reason: object) -> str:
    return (
        f"could not download checkpoint '{info.name}' from {info.url} ({reason}). "
        f"If this machine has no internet access, download that URL elsewhere and copy the "
        f"file to {dest} (exactly this name); `segany models` then checks it."
    )


def _download(info: CheckpointInfo, dest: Path, out: IO[bytes], progress: bool) -> tuple[int, str]:
    """Stream ``info.url`` into ``out``; return (bytes written, sha256 of them)."""
    from tqdm.auto import tqdm

    sha = hashlib.sha256()
    written = 0
    request = urllib.request.Request(info.url, headers={"User-Agent": _user_agent()})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else info.size
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=info.filename, disable=not progress,
            ) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as exc:  # disk full, quota: not a network problem
                        raise CheckpointError(
                            f"could not write the download of '{info.name}' into {dest.parent}: "
                            f"{exc}"
                        ) from exc
                    sha.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except CheckpointError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(_offline_message(info, dest, reason)) from exc
    if length and length.isdigit() and written != int(length):
        raise CheckpointError(
            _offline_message(
                info, dest, f"connection closed after {written:,} of {int(length):,} bytes"
            )
        )
    return written, sha.hexdigest()


def fetch(name: str, progress: bool = True, *, force: bool = False) -> Path:
    """Download checkpoint ``name`` into the cache (if needed) and return its path.

    The download goes to a temporary file in the same folder and is checked (size, sha256; or,
    without a published hash, that it loads as the promised architecture) before an atomic
    ``os.replace``, so the cache never holds a partial file under the final name. A present and
    verified file returns at once; a corrupt one is downloaded again; ``force=True`` always
    downloads. Without internet the error gives the URL and the exact path to put the file at.

    Example (needs the real checkpoint files)::

        path = fetch("mobile_sam")   # -> ~/.cache/segany/checkpoints/mobile_sam.pt
    """
    info = get_info(name)
    dest = checkpoint_path(name)
    if info.bundled:
        return bundled_path(name)
    if dest.exists() and not force:
        status = verify(name, progress=progress)
        if is_usable(status):
            return dest
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"segany: {dest} is {status}; downloading it again")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{info.filename}.", suffix=".part")
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint folder {dest.parent}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            written, digest = _download(info, dest, out, progress)
        if info.size is not None and written != info.size:
            raise CheckpointError(
                f"the download of '{info.name}' from {info.url} has the wrong size: "
                f"{_size_reason(written, info.size)}; nothing was saved"
            )
        if info.sha256 is not None and digest != info.sha256:
            raise CheckpointError(
                f"the download of '{info.name}' from {info.url} has sha256 {digest}, expected "
                f"{info.sha256}; the file was discarded. Try again; if it keeps failing the "
                "server may serve a different file."
            )
        if info.sha256 is not None:
            status = STATUS_VERIFIED
        else:
            status, _ = _verify_file(tmp, info, progress=False)
            if not is_usable(status):
                raise CheckpointError(
                    f"the download of '{info.name}' from {info.url} is not a usable checkpoint "
                    f"({status.removeprefix('corrupt: ')}); the file was discarded"
                )
        # mkstemp makes the file private (0600); a shared cache needs it readable like any
        # other downloaded file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        # Whatever happened (error, Ctrl-C), leave no partial file behind.
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    _write_sidecar(dest, info, status, digest)
    return dest


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# Keys under which training code commonly nests the state dict, in order of preference.
# "model_state" is torch-em/micro-sam's trainer layout ({"model_state": ..., "decoder_state": ...}).
_WRAPPER_KEYS = ("model_state", "state_dict", "model_state_dict", "model", "module", "net")
# Prefixes that wrappers add to every key: DataParallel/DDP ("module."), torch.compile
# ("_orig_mod."), micro-sam's trainable wrapper ("sam."), Lightning modules ("model.").
_KNOWN_PREFIXES = ("module.", "_orig_mod.", "sam.", "model.")
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

_VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
_VIT_DEPTHS = {"vit_b": 12, "vit_l": 24, "vit_h": 32}
#: Keys a file may carry that no SAM model uses (MobileSAM keeps TinyViT's classifier head).
KNOWN_UNUSED_PREFIXES: dict[str, tuple[str, ...]] = {
    "vit_t": ("image_encoder.head.", "image_encoder.norm_head."),
}


def _convert_hint(path: Path) -> str:
    # One line on purpose: the CLI prints every error as a single "segany: error:" line.
    out = path.with_name(f"{path.stem}_weights.pt")
    code = (
        f"import torch; obj = torch.load(r'{path}', map_location='cpu', weights_only=False); "
        "obj = obj.get('model', obj) if isinstance(obj, dict) else obj; "
        "sd = obj.state_dict() if hasattr(obj, 'state_dict') else obj; "
        f"torch.save({{k: v for k, v in sd.items() if torch.is_tensor(v)}}, r'{out}')"
    )
    return (
        f'If you trust its source, convert it once to a plain state dict: python -c "{code}" '
        f"and use {out}."
    )


def _sniff(head: bytes) -> str | None:
    """Name the kind of a file that is certainly not a torch checkpoint, else ``None``."""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (unpack it first)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file (not supported; convert it with safetensors.torch.load_file)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "an HTML/XML page (often a download error or login page saved under this name)"
    if text.startswith((b"{", b"[")):
        return "a JSON/text file"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return "a text file"
    return None


def _zip_is_complete(path: Path) -> bool:
    """True if the file ends with a zip "end of central directory" record, as whole zips do."""
    size = path.stat().st_size
    tail_size = min(size, 22 + 65535)  # the record is 22 bytes plus a comment of up to 64 KiB
    with open(path, "rb") as handle:
        handle.seek(size - tail_size)
        tail = handle.read(tail_size)
    return b"PK\x05\x06" in tail


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as handle:
        head = handle.read(64)
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = head[:1] == b"\x80"  # legacy torch.save format / plain pickle
    if not (is_zip or is_pickle):
        kind = _sniff(head)
        what = f"it looks like {kind}" if kind else "unknown file format"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what})")
    if is_zip and not _zip_is_complete(path):
        # Checked here rather than read from torch's error: depending on where the cut falls,
        # torch reports a missing central directory, an OSError from a seek, or worse.
        raise CheckpointError(
            f"{path} is truncated: the zip archive is cut short "
            f"({path.stat().st_size:,} bytes). Delete it and download it again."
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before failing on its own; our error says more.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Unsupported class" in text:
            needed = f" (it needs {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} stores Python objects, not only tensors{needed}. segany loads "
                "checkpoints with torch.load(weights_only=True) and refuses to unpickle code for "
                "safety. " + _convert_hint(path)
            ) from None
        raise CheckpointError(
            f"{path} is corrupted or not a PyTorch checkpoint (unreadable pickle data)"
        ) from None
    except EOFError:
        raise CheckpointError(
            f"{path} is truncated ({path.stat().st_size:,} bytes; the data ends early). "
            "Delete it and download it again."
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if is_zip and ("central directory" in text or "not a ZIP archive" in text):
            raise CheckpointError(
                f"{path} is truncated: the zip archive is cut short "
                f"({path.stat().st_size:,} bytes). Delete it and download it again."
            ) from None
        if is_zip and ("data.pkl" in text or "not in a subdirectory" in text):
            raise CheckpointError(
                f"{path} is a zip archive but not a PyTorch checkpoint (unpack it first?)"
            ) from None
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint: {first_line}"
        ) from None
    except (KeyError, ValueError, OSError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is corrupted or not a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def _has_tensors(obj: Any, depth: int = 0) -> bool:
    if torch.is_tensor(obj):
        return True
    if isinstance(obj, Mapping) and depth < 4:
        return any(_has_tensors(value, depth + 1) for value in obj.values())
    return False


def _describe_value(value: Any) -> str:
    if isinstance(value, Mapping):
        count = sum(1 for v in value.values() if torch.is_tensor(v))
        return f"dict with {len(value)} entries, {count} tensors"
    return type(value).__name__


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    trail: list[str] = []
    while True:
        if not isinstance(obj, Mapping):
            where = f" under {'/'.join(trail)}" if trail else ""
            raise CheckpointError(
                f"{path} holds a {type(obj).__name__}{where}, not a state dict (a mapping from "
                "parameter names to tensors)"
            )
        if any(torch.is_tensor(value) for value in obj.values()):
            break
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _has_tensors(inner):
                trail.append(key)
                obj = inner
                break
        else:
            where = f" under {'/'.join(trail)}" if trail else ""
            if not obj:
                raise CheckpointError(f"{path} holds an empty dict{where}, no tensors")
            listing = ", ".join(
                f"'{key}' ({_describe_value(value)})" for key, value in list(obj.items())[:8]
            )
            raise CheckpointError(
                f"{path} holds no tensors{where}: its entries are {listing}; none of the known "
                f"wrapper keys ({', '.join(_WRAPPER_KEYS)}) holds a state dict"
            )
    # Non-tensor entries beside the weights (an epoch counter, a version string) are metadata.
    state = {str(key): value for key, value in obj.items() if torch.is_tensor(value)}
    return _strip_prefixes(state)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    while state:
        keys = list(state)
        if any(key.startswith(_SAM_PARTS) for key in keys):
            return state
        prefix = next((p for p in _KNOWN_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            # Any other single shared first component that hides the SAM layout, e.g. "net.".
            first = {key.split(".", 1)[0] for key in keys}
            if len(first) == 1 and all("." in key for key in keys):
                candidate = f"{first.pop()}."
                if any(k[len(candidate):].startswith(_SAM_PARTS) for k in keys):
                    prefix = candidate
        if prefix is None:
            return state
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_state_dict(path: str | os.PathLike[str], model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint file safely and return a flat ``{name: tensor}`` dict on the CPU.

    Always ``torch.load(path, map_location="cpu", weights_only=True)``: a file that would need
    to unpickle code is refused with instructions to convert it. Wrapped layouts
    (``model``, ``state_dict``, ``model_state``, micro-sam's ``{"model_state": ...,
    "decoder_state": ...}``) are unwrapped and a prefix on every key (``module.``, ``sam.``,
    ``_orig_mod.``, ``model.``) is stripped. With ``model_type``, a file recognisably for
    another type is refused.

    Example (needs the real checkpoint files)::

        state = load_state_dict("sam_vit_b_01ec64.pth", model_type="vit_b")
        state["image_encoder.pos_embed"].shape   # -> torch.Size([1, 64, 64, 768])
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes), probably an interrupted download; delete it and "
            "download it again"
        )
    state = _unwrap(_torch_load(path), path)
    if model_type is not None:
        _check_type(state, model_type, path.name)
    return state


# --------------------------------------------------------------------------------------------
# Recognising and comparing state dicts
# --------------------------------------------------------------------------------------------


def _vit_depth(state: Mapping[str, Any]) -> int | None:
    indices = set()
    for key in state:
        if key.startswith("image_encoder.blocks."):
            part = key.split(".")[2]
            if part.isdigit():
                indices.add(int(part))
    return max(indices) + 1 if indices else None


def guess_model_type(state_dict: Mapping[str, Any]) -> str | None:
    """Recognise the SAM variant of a state dict from its keys, or return ``None``.

    ViT encoders are told apart by the width of ``image_encoder.patch_embed.proj.weight``
    (768 vit_b, 1024 vit_l, 1280 vit_h; a depth that does not match is a custom model);
    TinyViT (MobileSAM) by its ``image_encoder.layers.`` keys, width and depth. Custom
    widths give ``None`` (see :func:`describe_state_dict` for words).

    Example:
        >>> import torch
        >>> guess_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)})
        'vit_l'
        >>> wide_tiny_vit = {"image_encoder.layers.2.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
        ...                  "image_encoder.norm_head.weight": torch.zeros(512)}
        >>> guess_model_type(wide_tiny_vit) is None
        True
    """
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is not None and hasattr(weight, "shape") and len(weight.shape) >= 1:
        model_type = _VIT_WIDTHS.get(int(weight.shape[0]))
        depth = _vit_depth(state_dict)
        if model_type is not None and depth is not None and depth != _VIT_DEPTHS[model_type]:
            return None
        return model_type
    if any(str(key).startswith("image_encoder.layers.") for key in state_dict):
        # MobileSAM's TinyViT-5M: 320 output channels and 6 blocks in the third stage; any
        # other TinyViT (a user's wider or deeper one) is a custom configuration.
        head = state_dict.get("image_encoder.norm_head.weight")
        stage3 = {str(k).split(".")[4] for k in state_dict if str(k).startswith("image_encoder.layers.2.blocks.")}
        if head is not None and hasattr(head, "shape") and tuple(head.shape) == (320,) and len(stage3) == 6:
            return "vit_t"
        return None
    return None


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
    """Say in words which encoder a state dict holds (used in error messages).

    Example:
        >>> import torch
        >>> describe_state_dict({"image_encoder.patch_embed.proj.weight": torch.zeros(512, 3, 16, 16)})
        'a ViT encoder of width 512'
    """
    model_type = guess_model_type(state_dict)
    if model_type is not None:
        return f"a {model_type} checkpoint"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is not None and hasattr(weight, "shape") and len(weight.shape) >= 1:
        depth = _vit_depth(state_dict)
        depth_text = f" and depth {depth}" if depth is not None else ""
        return f"a ViT encoder of width {int(weight.shape[0])}{depth_text}"
    if not any(str(key).startswith("image_encoder.") for key in state_dict):
        return "no SAM image encoder"
    return "an unrecognised image encoder"


def _check_type(state: Mapping[str, Any], model_type: str, source: str) -> None:
    found = guess_model_type(state)
    if found is not None and found != model_type:
        raise CheckpointError(
            f"{source} is a {found} checkpoint but a {model_type} model was requested"
        )


def _shape(value: Any) -> str:
    shape = tuple(getattr(value, "shape", ()))
    return "x".join(str(int(n)) for n in shape) if shape else "scalar"


def _some(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {plural or word + 's'}"


def check_state_dict(
    model_state: Mapping[str, torch.Tensor] | torch.nn.Module,
    file_state: Mapping[str, torch.Tensor],
    source: str,
    model_type: str | None = None,
    *,
    ignore: Iterable[str] = (),
) -> None:
    """Raise :class:`CheckpointError` describing how ``file_state`` does not fit the model.

    ``model_state`` is ``model.state_dict()`` (or the module itself); non-persistent buffers
    such as ``pixel_mean``/``pixel_std`` are not in it and are not expected in files. A file
    recognisably for another SAM type gives "X is a vit_l checkpoint but a vit_b model was
    requested"; otherwise missing keys, unexpected keys and shape mismatches are listed.
    Unexpected keys under ``ignore`` prefixes (and MobileSAM's unused classifier head) and
    missing BatchNorm ``num_batches_tracked`` counters are tolerated.

    Example (needs the real checkpoint files)::

        state = load_state_dict("sam_vit_l_0b3195.pth")
        check_state_dict(build_sam("vit_b").state_dict(), state, "sam_vit_l_0b3195.pth", "vit_b")
        # CheckpointError: sam_vit_l_0b3195.pth is a vit_l checkpoint but a vit_b model was requested
    """
    if isinstance(model_state, torch.nn.Module):
        model_state = model_state.state_dict()
    if model_type is None:
        model_type = guess_model_type(model_state)
    if model_type is not None:
        _check_type(file_state, model_type, source)
    ignored = tuple(ignore) + KNOWN_UNUSED_PREFIXES.get(model_type or "", ())

    missing = [
        key for key in model_state
        if key not in file_state
        # BatchNorm's step counter is not a weight; torch fills it in when it is absent.
        and not key.endswith(".num_batches_tracked")
    ]
    unexpected = [
        key for key in file_state
        if key not in model_state and not (ignored and key.startswith(ignored))
    ]
    mismatched = [
        f"{key}: file {_shape(file_state[key])}, model {_shape(model_state[key])}"
        for key in model_state
        if key in file_state and tuple(file_state[key].shape) != tuple(model_state[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_plural(len(missing), 'key')} ({_some(missing)})")
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')} ({_some(unexpected)})")
    if mismatched:
        count = _plural(len(mismatched), "shape mismatch", "shape mismatches")
        problems.append(f"{count} ({_some(mismatched, 2)})")
    if problems:
        target = f"the {model_type} model" if model_type else "the model"
        raise CheckpointError(
            f"{source} ({describe_state_dict(file_state)}) does not fit {target}: "
            + ", ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Names or paths
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
) -> tuple[Path, str | None, CheckpointInfo | None]:
    """Turn a registry name or a file path into ``(path, model_type, info)``.

    A registry name gives its cached file (an error says how to get it if it is missing) with
    the registry's model type; an existing file gives ``(path, None, None)`` (the caller guesses
    the type from the weights); anything else is an error.

    Example (needs the real checkpoint files)::

        resolve_checkpoint("sam_vit_b")
        # -> (PosixPath('~/.cache/segany/checkpoints/sam_vit_b_01ec64.pth'), 'vit_b', CheckpointInfo(...))
        resolve_checkpoint("weights/finetuned.pth")
        # -> (PosixPath('weights/finetuned.pth'), None, None)
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in REGISTRY:
        info = REGISTRY[text]
        if info.bundled:
            return bundled_path(text), info.model_type, info
        path = checkpoint_path(text)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint '{text}' is not downloaded yet: run `segany fetch {text}`, or "
                f"download {info.url} and put it at {path}"
            )
        return path, info.model_type, info
    path = Path(text).expanduser()
    if path.is_file():
        return path, None, None
    if path.exists():
        raise CheckpointError(f"checkpoint path {path} is a folder, not a file")
    looks_like_path = os.sep in text or "/" in text or path.suffix in (".pth", ".pt", ".ckpt", ".bin")
    if looks_like_path:
        raise CheckpointError(f"checkpoint file {path} does not exist")
    raise CheckpointError(
        f"'{text}' is neither an existing file nor a known checkpoint name. "
        + _known_names_hint(text)
    )
