"""`radgate` command line: one entry point, one subcommand per job.

Each subcommand's implementation is imported only when it runs, so `radgate --help`
and the light commands (check-config, studies) start without loading PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from inference.errors import RadgateError

Handler = Callable[[argparse.Namespace], int]


def _lazy(target: str) -> Handler:
    module_name, function_name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(module_name)
        handler: Handler = getattr(module, function_name)
        return handler(args)

    return run


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the chest/abdomen classifier (the seed notebook)")
    p.add_argument("--data", type=Path, required=True, help="folder with train/ val/ test/")
    p.add_argument("--out", type=Path, required=True, help="model directory to create")
    p.add_argument("--arch", choices=["resnet18", "efficientnet_lite0"], default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--size", type=int, default=224, help="input size in pixels")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--preprocessing",
        choices=["robust", "trim", "seed"],
        default=None,
        help="seed: the notebook's pipeline (default); trim: the seed's plus flat-border"
        " (collimation) trim; robust: percentile window + border trim",
    )
    p.add_argument(
        "--augmentation",
        choices=["mixed", "crops", "radiograph", "seed"],
        default=None,
        help="mixed (default): the notebook's aug_transforms, with random crops down to half"
        " the image's area for the first soup member and the notebook's crops for the others;"
        " crops: down to half the area for every member; seed: the notebook's aug_transforms;"
        " radiograph: crops plus collimation borders, gamma and stronger lighting",
    )
    p.add_argument(
        "--detail-side",
        type=int,
        default=None,
        metavar="PX",
        help="reduce every image's shorter side to at most PX pixels before the geometry, so"
        " source resolution carries no label (default 160; 0: off, as in the notebook:"
        " --arch resnet18 --detail-side 0 --augmentation seed is the notebook's recipe)",
    )
    p.add_argument(
        "--soup",
        type=int,
        default=None,
        metavar="N",
        help="fine-tune N models from the same starting weights (seeds --seed, --seed+1, ...)"
        " and serve the average of their weights (default 3 for efficientnet_lite0, 1 for"
        " resnet18; 1: a single model)",
    )
    p.add_argument("--weights", type=Path, default=None, help="ImageNet state dict to fine-tune")
    p.add_argument("--cv", type=int, default=0, metavar="K", help="K-fold cross-validation")
    p.add_argument(
        "--cv-seeds",
        type=int,
        default=1,
        metavar="N",
        help="repeat the cross-validation with N seeds (--seed, --seed+1, ...)",
    )
    p.add_argument("--external", type=Path, default=None, help="external evaluation set")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=_lazy("training.train:command"))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="print a trained model's evaluation")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None, help="re-score the test split of DIR")
    p.set_defaults(handler=_lazy("training.evaluate:command"))


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="CAM / Grad-CAM overlays for images")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--method", choices=["cam", "gradcam"], default="gradcam")
    p.add_argument("--block", type=int, default=-1, help="body block, -8..-1 as in the seed")
    p.add_argument(
        "--target", default=None, metavar="CLASS", help="class to explain (default: predicted)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="files or folders")
    p.set_defaults(handler=_lazy("inference.commands:explain"))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify DICOM, PNG or JPEG files; JSON lines out")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--gradcam", type=Path, default=None, metavar="OUT_DIR")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("inputs", type=Path, nargs="+", metavar="FILE_OR_DIR", help="folders: recursive")
    p.set_defaults(handler=_lazy("inference.commands:predict"))


def _add_samples(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("samples", help="wrap the sample PNGs as DICOM radiograph studies")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", action="store_true", help="add the odd cases a gateway meets")
    p.add_argument("--split", default="test", help="which split(s) to wrap: test, val, train, all")
    p.set_defaults(handler=_lazy("inference.samples:command"))


def _add_gateway_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM gateway")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.set_defaults(handler=_lazy("gateway.service:command"))

    p = sub.add_parser("web", help="run the audit dashboard alone (the `web` section)")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.set_defaults(handler=_lazy("gateway.web:command"))

    p = sub.add_parser("demo", help="run the gateway on the sample radiographs, end to end")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.add_argument("--data", type=Path, required=True, help="the sample data (train/ val/ test/)")
    p.add_argument("--work", type=Path, default=Path("var/demo"), help="samples, logs, destination")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for delivery")
    p.add_argument("--keep-running", action="store_true", help="leave the gateway running")
    p.set_defaults(handler=_lazy("gateway.demo:command"))

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("config", type=Path)
    p.set_defaults(handler=_lazy("gateway.config:command"))

    p = sub.add_parser("studies", help="audit view of received studies")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_lazy("gateway.audit:studies_command"))

    p = sub.add_parser("show", help="everything recorded for one study")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.add_argument("study_uid")
    p.set_defaults(handler=_lazy("gateway.audit:show_command"))

    p = sub.add_parser(
        "audit", help="audit log: associations, security refusals, forwards, decisions"
    )
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.add_argument(
        "--kind",
        action="append",
        default=None,
        metavar="KIND",
        help="only this kind (association, security, forward, decision, ...); repeatable",
    )
    p.add_argument("--since", default=None, help="only events at or after this ISO 8601 time")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lazy("gateway.audit:audit_command"))

    p = sub.add_parser("route", help="dry run: which routes match a stored study and why")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.add_argument("study_uid")
    p.set_defaults(handler=_lazy("gateway.routing:route_command"))

    p = sub.add_parser("retry", help="requeue dead-lettered forward jobs")
    p.add_argument("--config", type=Path, default=Path("config.yaml"))
    p.add_argument("study_uid", nargs="?", default=None, help="requeue this study's dead jobs")
    p.add_argument("--dead", action="store_true", help="requeue every dead-lettered job")
    p.add_argument("--destination", default=None, metavar="NAME", help="only jobs to NAME")
    p.set_defaults(handler=_lazy("gateway.forward:retry_command"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radgate",
        description="DICOM AI gateway: gate, classify, explain, record and route radiographs",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_explain, _add_predict, _add_samples):
        add(sub)
    _add_gateway_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Libraries that narrate routine steps at INFO (migrations, codec tiles).
        for name in ("alembic", "openjpeg", "matplotlib", "pydicom"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.handler(args))
    except RadgateError as error:
        print(f"radgate {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
