"""Command line: `python -m training train|predict|evaluate|export|models|reconcile|demo`.

Bad input ends with a non-zero exit and a one-line reason on stderr, never a
traceback: every error a user can cause is a `TrainingError` or a `ValueError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, closing, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

# Quiet TensorFlow's C++ start-up logs before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from training.errors import Cancelled, TrainingError  # noqa: E402
from training.exports import FORMATS  # noqa: E402
from training.jobs.cli import RECONCILE_HELP, add_reconcile_arguments, command_reconcile  # noqa: E402
from training.settings import Settings  # noqa: E402

if TYPE_CHECKING:
    from training.batch_predict import Row, Summary

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


PREDICT_HELP = """\
Predict every image of the SOURCEs with a stored model, in input order: files as given,
folders walked recursively in sorted order (hidden files and folders left out, links to
folders not followed), archives unpacked safely into a temporary folder under DATA_DIR and
named as archive.zip:member/path.png.

A file that cannot be read (not an image, truncated, too many pixels, over MAX_PREDICT_MB) is a
row with its reason in `error` and no label; the run goes on and lists such files on stderr.
Exit status 0 when at least one image was predicted; 2 with a one-line reason when the model or
a source does not exist, or no image at all could be read (FILE is still written then).

Without --out: one `path: label (top k)` line per file, or with --json one JSON document.
--out results.csv: columns path,label,probability,top_k,error; top_k is a JSON list
  [{"label": ..., "probability": ...}, ...]; label, probability and top_k are empty for an error.
--out results.jsonl: one {"path", "label", "probability", "top_k", "error"} object per line.
Rows are written as each batch is scored, to a temporary file renamed to FILE at the end.
"""


EXPORT_HELP = """\
Export a stored version as one self-contained float32 model: RGB pixels [N, H, W, 3] (0..255, the
version's image size) in, class probabilities [N, C] out, VGG19's preprocessing inside. With
labels.txt and a README.md on how to call it. Layouts that drop into their servers as they are:

  savedmodel  NAME/VERSION/saved_model.pb: a TensorFlow Serving model base path (NAME)
  onnx        NAME/config.pbtxt, NAME/VERSION/model.onnx: a Triton model repository
  tflite      model.tflite, with model_float16.tflite and model_dynamic_range.tflite (LiteRT)
  keras       model.keras (loads with safe_mode=True, without this project's code)
"""


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """Flags named as the training options of `training.options` (dashes for underscores)."""
    add = parser.add_argument
    add("--epochs", type=int, help="head epochs (default 50, early stopping on val loss)")
    add("--batch-size", type=int, help="head batch size (default 32)")
    add("--optimizer", choices=("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam"),
        help="default nesterov (SGD with Nesterov momentum)")
    add("--learning-rate", type=float, help="default 0.01 for SGD variants, 0.001 for adam/rmsprop")
    add("--hidden-units", type=int, help="hidden Dense layer size, 0 for a linear head (default 256)")
    add("--dropout", type=float, help="dropout after the hidden layer (default 0.3)")
    add("--l2", type=float, help="L2 regularization (default 1e-4)")
    add("--patience", type=int, help="early-stopping patience in epochs (default 8)")
    add("--no-class-weights", dest="class_weights", action="store_false", default=None,
        help="do not weight classes by inverse frequency")
    add("--image-size", type=int, help="input size in pixels (default 224; 32 to 1024)")
    add("--feature-layer", choices=("avg", "fc2"), help="avg: pooled block5 (512-d), fc2: 4096-d (224 px)")
    add("--val-split", type=float, help="validation fraction when the data has no val/ folder (default 0.2)")
    add("--seed", type=int, help="split and initialization seed (default 0)")
    add("--publish", choices=("auto", "always", "never"),
        help="auto: publish the first version and any at least as accurate as the published one")
    add("--fine-tune", action="store_true", default=None, help="then unfreeze the top of VGG19 and train end to end")
    add("--fine-tune-epochs", type=int, help="fine-tune epochs (default 5)")
    add("--fine-tune-learning-rate", type=float, help="fine-tune learning rate (default 1e-4)")
    add("--unfreeze-blocks", type=int, help="number of top VGG19 conv blocks to unfreeze (default 1)")
    add("--freeze-first", type=int, help="instead: unfreeze all layers but the first N")
    add("--no-augment", dest="augment", action="store_false", default=None,
        help="no flip/rotation/zoom while fine-tuning")
    add("--fine-tune-keep", choices=("better", "always"),
        help="better (default): keep the fine-tuned model only if it beats the head on validation")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="model store (default MODEL_DIR or ./models)")
    parser.add_argument("--data-dir", type=Path, help="datasets and feature cache (default DATA_DIR or ./data)")
    parser.add_argument("--weights", help="backbone weights: imagenet, none, or a file (default BACKBONE_WEIGHTS)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a new model version on a folder, .zip or .tar.gz")
    train.add_argument("data", help="dataset: folder of class folders, or an archive of one")
    train.add_argument("--model", required=True, help="model name")
    _add_train_options(train)

    predict = sub.add_parser("predict", help="predict image files, folders and archives with a stored model",
                             description=PREDICT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("sources", nargs="+", metavar="SOURCE",
                         help="an image file, a folder (walked recursively) or a .zip/.tar.gz/.tgz/.tar archive")
    predict.add_argument("--model", required=True, help="model name")
    predict.add_argument("--version", type=int, help="default: the published version")
    predict.add_argument("--top-k", type=int, default=3, help="labels per image (default 3)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    shown = predict.add_mutually_exclusive_group()
    shown.add_argument("--out", type=Path, metavar="FILE",
                       help="write FILE (.csv or .jsonl, see above) instead of printing")
    shown.add_argument("--json", action="store_true", help="print JSON")

    evaluate = sub.add_parser("evaluate", help="score a stored model on a labeled dataset")
    evaluate.add_argument("data")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--version", type=int)
    evaluate.add_argument("--json", action="store_true", help="print JSON")

    export = sub.add_parser("export", help="export a version as one SavedModel, ONNX, TFLite or Keras model",
                            description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--model", required=True, help="model name")
    export.add_argument("--version", type=int, help="default: the published version")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--out", required=True, type=Path, metavar="PATH",
                        help="a new (or empty) folder, or a file ending in .tar.gz for an archive of it")

    models = sub.add_parser("models", help="list stored models")
    models.add_argument("--json", action="store_true", help="print JSON")

    # The job system's own command (`python -m training.jobs reconcile`), offered here too.
    add_reconcile_arguments(sub.add_parser("reconcile", help=RECONCILE_HELP))

    demo = sub.add_parser("demo", help="make the sample digits dataset, train on it and predict")
    demo.add_argument("--image-size", type=int, default=64)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {"model_dir": args.model_dir, "data_dir": args.data_dir, "backbone_weights": args.weights}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


class ProgressBars:
    """Show training progress callbacks as rich progress bars, one per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.tasks = progress, {}

    def __call__(self, report) -> None:
        if report.phase not in self.tasks:
            self.tasks[report.phase] = self.progress.add_task(report.phase, total=max(report.total, 1))
        task = self.tasks[report.phase]
        description = report.phase
        if report.metrics:
            shown = {k: v for k, v in report.metrics.items() if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
            description += " " + " ".join(f"{k}={v:.3f}" for k, v in shown.items())
        self.progress.update(task, completed=report.current, total=max(report.total, 1), description=description)


def command_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train and print a summary table."""
    from training.options import OPTIONS, parse_options
    from training.pipeline import train

    params = parse_options({name: getattr(args, name, None) for name in OPTIONS})
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bars:
        result = train(args.data, args.model, settings, params, progress=ProgressBars(bars))
    for skipped in result.dataset["skipped"][:20]:
        console.print(f"[yellow]skipped[/] {skipped['path']}: {skipped['reason']}")
    for warning in result.dataset["warnings"]:
        console.print(f"[yellow]warning[/] {warning}")
    table = Table(title=f"{result.name} v{result.version}" + (" (published)" if result.published else ""))
    table.add_column("class")
    for column in ("precision", "recall", "f1", "support"):
        table.add_column(column, justify="right")
    for label, scores in result.metrics["per_class"].items():
        table.add_row(label, *(f"{scores[c]:.3f}" for c in ("precision", "recall", "f1")), str(scores["support"]))
    out.print(table)
    metrics = result.metrics
    out.print(f"validation accuracy {metrics['accuracy']:.4f}, top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}"
              f", loss {metrics['loss']:.4f} on {metrics['samples']} images; "
              f"features computed for {result.features_computed} images; "
              f"time " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    return 0


def command_predict(args: argparse.Namespace, settings: Settings) -> int:
    """Predict files, folders and archives; write the rows to --out, or print them."""
    from training.batch_predict import Summary, check_output, check_sources, load_model, predict_sources

    if args.out is not None:
        check_output(args.out)  # a bad name fails before the model loads or any image is read
    sources = check_sources(args.sources)
    model, forward = load_model(settings, args.model, args.version)
    summary, printed = Summary(), []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # Rows printed to stdout go through the bar's console only when stdout is a terminal too: redirected
    # output must stay in its file, not land on stderr's screen. No bar (not even its blank line) in a log.
    with Progress(*columns, console=console, transient=True, redirect_stdout=out.is_terminal,
                  disable=not console.is_terminal) as bars, \
            _row_sink(args, printed) as write_rows:
        task = bars.add_task(f"predict {model.name} v{model.version}", total=None)
        listed = 0

        def found(count: int) -> None:
            nonlocal listed
            listed += count
            bars.update(task, total=listed)

        with closing(predict_sources(settings, model, forward, sources, args.top_k, args.batch_size,
                                     found)) as batches:
            for rows in batches:
                write_rows(rows)
                summary.add(rows)
                bars.advance(task, len(rows))
    summary.check()
    if args.json:
        out.print_json(json.dumps({"model": model.name, "version": model.version,
                                   "predictions": [row.as_dict() for row in printed]}))
    _print_summary(summary, args.out)
    return 0


def _row_sink(args: argparse.Namespace, printed: list[Row]) -> AbstractContextManager[Callable[[Iterable[Row]], None]]:
    """Where predicted rows go: the --out file, `printed` (for --json, printed at the end), or stdout lines."""
    from training.batch_predict import open_results

    if args.out is not None:
        return open_results(args.out)
    return nullcontext(printed.extend if args.json else _print_rows)


def _print_rows(rows: Iterable[Row]) -> None:
    """Print each row as `path: label (top k)` or `path: error: reason`, as today's predict did."""
    for row in rows:
        if row.error is not None:
            out.print(f"{row.path}: error: {row.error}", markup=False, highlight=False)
        else:
            top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in row.top_k)
            out.print(f"{row.path}: {row.label} ({top})", markup=False, highlight=False)


def _print_summary(summary: Summary, written: Path | None) -> None:
    """Say on stderr how many images were predicted and which files could not be read."""
    where = f", wrote {written}" if written is not None else ""
    unreadable = f", {summary.unreadable} unreadable" if summary.unreadable else ""
    images = "image" if summary.predicted == 1 else "images"
    console.print(f"predicted {summary.predicted} {images}{unreadable}{where}", markup=False, highlight=False)
    for row in summary.errors:
        console.print(f"  {row.path}: {row.error}", markup=False, highlight=False)
    if summary.unreadable > len(summary.errors):
        console.print(f"  ... and {summary.unreadable - len(summary.errors)} more", markup=False, highlight=False)


def command_export(args: argparse.Namespace, settings: Settings) -> int:
    """Export a version into a folder, or into a .tar.gz of one."""
    import tempfile

    from training.export import export_version
    from training.exports import write_archive

    archive = args.out.name.endswith(".tar.gz")
    with console.status(f"exporting {args.model} as {args.format}"):
        if not archive:
            result = export_version(settings, args.model, args.version, args.format, args.out)
        else:
            if args.out.exists():
                raise TrainingError(f"--out {args.out} exists; an export never overwrites")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".export-") as work:
                result = export_version(settings, args.model, args.version, args.format, Path(work) / "export")
                write_archive(result.root, args.out)
    where = args.out if archive else args.out / result.model_file
    console.print(f"exported {result.name} v{result.version} as {result.fmt} ({len(result.classes)} classes, "
                  f"{result.image_size} px): {where}", markup=False, highlight=False)
    return 0


def command_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Score a stored model on a dataset."""
    from training.predict import evaluate_dataset

    metrics = evaluate_dataset(settings, args.model, args.data, args.version)
    if args.json:
        out.print_json(json.dumps(metrics))
    else:
        out.print(f"accuracy {metrics['accuracy']:.4f}, top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f} "
                  f"on {metrics['samples']} images")
    return 0


def command_models(args: argparse.Namespace, settings: Settings) -> int:
    """List stored models."""
    from training.store import ModelStore

    store = ModelStore.from_settings(settings)
    models = [store.describe(name) for name in store.names()]
    if args.json:
        out.print_json(json.dumps(models))
        return 0
    table = Table(title=f"models in {settings.model_dir}")
    for column in ("name", "versions", "published", "accuracy", "classes"):
        table.add_column(column)
    for model in models:
        latest = model["versions"][-1]
        published = next((v for v in model["versions"] if v["published"]), latest)
        table.add_row(model["name"], ", ".join(str(v["version"]) for v in model["versions"]),
                      str(model["published"] or "-"), f"{published['metrics']['accuracy']:.3f}",
                      ", ".join(published["classes"]))
    out.print(table)
    return 0


def command_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo."""
    from training.demo import run_demo

    return run_demo(settings, args.image_size, console, out)


COMMANDS = {"train": command_train, "predict": command_predict, "evaluate": command_evaluate,
            "export": command_export, "models": command_models, "reconcile": command_reconcile, "demo": command_demo}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        return COMMANDS[args.command](args, settings)
    except (TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: no such file: {exc.filename}", file=sys.stderr)
        return 2
    except Cancelled:
        console.print("cancelled")
        return 130
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
