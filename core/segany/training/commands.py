"""Command-line front-ends of training and the data engine.

``segany train``, ``segany pseudo-label`` and ``segany engine-round`` are registered by
:func:`register_training_commands` (called from :mod:`segany.cli`).

Example:
    >>> from segany.cli import build_parser
    >>> args = build_parser().parse_args(["train", "--config", "run.yaml", "--resume"])
    >>> args.config, args.resume
    ('run.yaml', True)
    >>> args = build_parser().parse_args(["pseudo-label", "a.png", "-o", "out", "--pred-iou-thresh", "0.9"])
    >>> args.images, args.output, args.pred_iou_thresh
    (['a.png'], 'out', 0.9)
"""

from __future__ import annotations

import argparse

__all__ = ["register_training_commands"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    overrides = {}
    if args.output is not None:
        overrides["output_dir"] = args.output
    if args.device is not None:
        overrides["device"] = args.device
    if args.steps is not None:
        overrides["steps"] = args.steps
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            from ..errors import SegAnyError

            raise SegAnyError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}")
        import yaml

        overrides[key.strip()] = yaml.safe_load(value)
    config = load_config(args.config, overrides)
    if args.quiet:
        config.progress = False
    result = train(config, resume=args.resume)
    print(f"trained {result.step} steps in {result.seconds:.0f} s: {result.model_path}")
    if result.metrics:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items())))
    if result.best_path is not None:
        print(f"best validation checkpoint: {result.best_path}")
    return 0


def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from ..data_engine import pseudo_label

    report = pseudo_label(
        args.images,
        args.output,
        model=args.model,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_thresh=args.stability_thresh,
        box_nms_thresh=args.box_nms_thresh,
        points_per_side=args.points_per_side,
        min_area=args.min_area,
        device=args.device,
        progress=not args.quiet,
    )
    print(
        f"{report.output}: {len(report.written)} image(s) labelled ({report.objects} objects), "
        f"{len(report.skipped)} already done, {len(report.empty)} without confident masks"
    )
    return 0


def _cmd_engine_round(args: argparse.Namespace) -> int:
    from ..data_engine import engine_round

    path = engine_round(
        args.config,
        args.images,
        args.round_dir,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_thresh=args.stability_thresh,
        points_per_side=args.points_per_side,
        progress=not args.quiet,
    )
    print(f"next training configuration: {path}  (run: segany train --config {path})")
    return 0


def _add_thresholds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88,
                        help="keep masks whose predicted IoU is at least this (default 0.88)")
    parser.add_argument("--stability-thresh", type=float, default=0.95,
                        help="keep masks whose stability score is at least this (default 0.95)")
    parser.add_argument("--points-per-side", type=int, default=32,
                        help="automatic-mode point grid density (default 32)")


def register_training_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``pseudo-label`` and ``engine-round`` to the ``segany`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a SAM model from a YAML configuration",
        description=(
            "Train or fine-tune a SAM model with the SAM paper's interactive recipe. The YAML "
            "configuration is described in segany.training.config (and docs/dataset-format.md "
            "for the data). Outputs: model.pt (official layout), best.pt, resume.pt, log.csv, "
            "curves.png in output_dir."
        ),
    )
    p.add_argument("--config", required=True, help="training configuration (YAML)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/resume.pt if present")
    p.add_argument("--output", help="output folder (overrides output_dir)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (overrides device)")
    p.add_argument("--steps", type=int, help="number of steps (overrides steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any field, e.g. --set optim.lr=1e-4 --set freeze.image_encoder=true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "pseudo-label",
        help="label images automatically (data engine, fully automatic stage)",
        description=(
            "Run automatic mask generation on images, keep confident and stable masks, resolve "
            "overlaps and write a dataset folder (images/, labels/, prompts/, dataset.json) "
            "marked partial. Images already written are skipped, so an interrupted run resumes."
        ),
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="dataset folder to write")
    p.add_argument("--model", help="checkpoint name (segany models), file, or a model.pt trained by segany")
    _add_thresholds(p)
    p.add_argument("--box-nms-thresh", type=float, default=0.7, help="box NMS IoU (default 0.7)")
    p.add_argument("--min-area", type=int, default=16, help="smallest object kept, pixels (default 16)")
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pseudo_label)

    p = subparsers.add_parser(
        "engine-round",
        help="one data-engine round: train, pseudo-label new images, write the next config",
        description=(
            "Train with CONFIG (output in ROUND_DIR/train), pseudo-label IMAGES with the new model "
            "(ROUND_DIR/pseudo, partial labels), and write ROUND_DIR/next.yaml that trains on the "
            "manual and pseudo labels together. Resumable."
        ),
    )
    p.add_argument("--config", required=True, help="training configuration (YAML)")
    p.add_argument("--round-dir", required=True, help="folder of this round")
    p.add_argument("images", nargs="+", help="unlabelled image files or folders")
    _add_thresholds(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_engine_round)

