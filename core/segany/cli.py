"""The ``segany`` command line.

Each subcommand is added by a small ``register_*`` function that receives the subparsers
object and sets ``func`` (``args -> exit code``) on its parser; later work adds ``embed``,
``segment``, ``auto``, ``batch``, ``train``, ``eval`` and ``pseudo-label`` the same way,
either by appending to :data:`COMMANDS` or with :func:`add_command`.

User errors (:class:`~segany.errors.SegAnyError`) print one line,
``segany: error: <message>``, on stderr and exit with status 2, never a traceback.

Example:
    $ segany models
    $ segany fetch mobile_sam
    $ segany --version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import SegAnyError

__all__ = ["main", "build_parser", "add_command", "COMMANDS", "version"]

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

EXIT_OK = 0
EXIT_ERROR = 2  # same status argparse uses for usage errors: one code for "you asked wrongly"
EXIT_INTERRUPTED = 130


def version() -> str:
    """Return segany's version (package attribute, installed metadata, or "unknown").

    Example:
        >>> version() == __import__("segany").__version__
        True
    """
    try:
        from . import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("segany")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def _human_size(size: int | None) -> str:
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"  # not reached


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        # The last column (a path) is not padded, so long paths do not leave trailing blanks.
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# segany models
# --------------------------------------------------------------------------------------------


def _cmd_models(args: argparse.Namespace) -> int:
    from . import checkpoints

    rows = [["name", "model type", "size", "status", "path"]]
    for info, status in checkpoints.list_checkpoints():
        if args.verify and status != checkpoints.STATUS_MISSING:
            # Hashing a multi-GB file takes a while: show progress unless asked not to.
            status = checkpoints.verify(info.name, force=True, progress=not args.quiet)
        rows.append([
            info.name,
            info.model_type,
            _human_size(info.size),
            status,
            str(checkpoints.checkpoint_path(info.name)),
        ])
    print(_table(rows))
    print()
    print(f"cache: {checkpoints.segany_home() / 'checkpoints'} (set SEGANY_HOME to move it)")
    print("get one with `segany fetch NAME`; `segany models --verify` hashes what is present")
    return EXIT_OK


def register_models(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segany models``: a table of known checkpoints and their status."""
    parser = subparsers.add_parser(
        "models",
        help="list known checkpoints and whether they are downloaded and intact",
        description="List the known checkpoints with model type, size, status and path.",
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="hash every present file again (otherwise earlier results are reused)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_cmd_models)


# --------------------------------------------------------------------------------------------
# segany fetch
# --------------------------------------------------------------------------------------------


def _cmd_fetch(args: argparse.Namespace) -> int:
    from . import checkpoints

    path = checkpoints.fetch(args.name, progress=not args.quiet, force=args.force)
    status = checkpoints.verify(args.name)
    print(f"{args.name}: {status}: {path}")
    return EXIT_OK


def register_fetch(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segany fetch NAME [--force]``: download and verify one checkpoint."""
    parser = subparsers.add_parser(
        "fetch",
        help="download a checkpoint into the cache and verify it",
        description=(
            "Download a known checkpoint into the cache and verify it. Offline, the error says "
            "which URL to download elsewhere and where to put the file."
        ),
    )
    parser.add_argument("name", help="checkpoint name, as listed by `segany models`")
    parser.add_argument(
        "--force", action="store_true", help="download again even if a verified copy exists"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_fetch)


# --------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------

#: Registration functions, called in order to build the parser.
COMMANDS: list[Register] = [register_models, register_fetch]


def add_command(register: Register) -> Register:
    """Register a subcommand (usable as a decorator); returns ``register`` unchanged.

    Example:
        >>> @add_command
        ... def register_hello(subparsers):
        ...     parser = subparsers.add_parser("hello", help="say hello")
        ...     parser.set_defaults(func=lambda args: 0)
        >>> main(["hello"])
        0
        >>> COMMANDS.remove(register_hello)  # an example only: keep the real list clean
    """
    if register not in COMMANDS:
        COMMANDS.append(register)
    return register


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors print a single ``segany: error:`` line.

    argparse's default prints the whole usage block first; one line keeps the error format
    the same for bad arguments and for errors found later (a missing file, an unknown name).
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"segany: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``segany`` argument parser from :data:`COMMANDS`.

    Example:
        >>> build_parser().parse_args(["fetch", "mobile_sam"]).name
        'mobile_sam'
    """
    parser = _Parser(
        prog="segany",
        description="Segment Anything for scientists and GIS analysts.",
    )
    parser.add_argument("--version", action="version", version=f"segany {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``segany`` command line and return its exit status.

    Example::

        main(["models"])   # prints the checkpoint table, returns 0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: keep their status
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return int(args.func(args) or EXIT_OK)
    except SegAnyError as exc:
        # One line, no traceback: the message already names the file/argument to fix.
        print(f"segany: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("segany: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@add_command
def register_eval(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segany eval``: SAM-paper protocols on a labelled dataset (see segany.evaluation)."""
    from .evaluation import register_eval_command

    register_eval_command(subparsers)


@add_command
def register_raster_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segany embed``, ``segment``, ``auto`` and ``batch``: large rasters in map
    coordinates (see segany.tiling, segany.scene, segany.batch)."""
    from .batch import register_batch_command
    from .scene import register_scene_commands
    from .tiling import register_embed_command

    register_embed_command(subparsers)
    register_scene_commands(subparsers)
    register_batch_command(subparsers)


@add_command
def register_training(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segany train``, ``pseudo-label`` and ``engine-round`` (see segany.training and
    segany.data_engine)."""
    from .training.commands import register_training_commands

    register_training_commands(subparsers)


if __name__ == "__main__":  # python -m segany.cli
    sys.exit(main())
