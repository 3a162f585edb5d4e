"""``brainscan train|evaluate|export|audit``: the training side, from a folder of scans to a served model.

Thin commands over ``training/`` (Keras) and ``brainscan.runtime`` (the loader the workers use).
TensorFlow is imported inside the commands so ``brainscan --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import typer

from brainscan.settings import get_settings

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tee(io.TextIOBase):
    """Writes to a terminal stream and, cleaned up, to a log file.

    Keras' and rich's progress bars redraw one line with ``\\r``/``\\b`` and ANSI codes; the log keeps
    only each line's final state, so it reads like the run did.
    """

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log, self._pending = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self._pending += _ANSI.sub("", text).replace("\b", "")
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self.log.write(line.rsplit("\r", 1)[-1] + "\n")
        self._pending = self._pending.rsplit("\r", 1)[-1]  # bounded: only the line being redrawn
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def close_pending(self) -> None:
        if self._pending.strip():
            self.log.write(self._pending + "\n")
        self._pending = ""

    def isatty(self) -> bool:  # progress bars animate only on a terminal
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def tee_output(log_path: Path) -> Iterator[None]:
    """Copy this process' stdout and stderr (Python-level) to ``log_path``, appending."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(
            f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} "
            f"{shlex.join(['brainscan', *sys.argv[1:]])}\n"
        )
        out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
            out.close_pending()
            err.close_pending()


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _cache_dir_option() -> Any:
    """``--cache-dir`` of the commands that decode a scan folder."""
    return typer.Option(None, "--cache-dir", help="Decoded-scan cache; default <var_dir>/cache.")


def _decode_cache(cache_dir: Path | None) -> Path:
    """The decoded-scan cache: ``--cache-dir``, else ``<var_dir>/cache``."""
    return cache_dir or get_settings().var_dir / "cache"


def train_command(
    data: Path = typer.Option(
        ..., "--data", help="Training folder: <data>/<class>/<image>.", exists=True, file_okay=False
    ),
    out: Path = typer.Option(..., "--out", help="Model folder to write: models/<name>/<version>."),
    arch: str = typer.Option("compact", "--arch", help="compact (the default model) or resnet50 (original)."),
    weights: str = typer.Option(
        "none", "--weights", help="resnet50 backbone: imagenet, none, or a weights file."
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Total epochs (stages keep their shares)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Images per training step (default: the recipe's own)."
    ),
    seed: int | None = typer.Option(
        None,
        "--seed",
        help="Seed for initial weights, augmentation and batch order (default: the recipe's); "
        "the validation split does not change with it.",
    ),
    input_size: int | None = typer.Option(
        None,
        "--input-size",
        min=32,
        max=512,
        help="Square input side in pixels (default: the recipe's own); scans are decoded at it.",
    ),
    mixup: float | None = typer.Option(
        None,
        "--mixup",
        min=0.0,
        max=1.0,
        help="Mixup's Beta(alpha, alpha) for training batches; 0 turns it off (default: the recipe's).",
    ),
    test: Path | None = typer.Option(
        None, "--test", help="A test folder, evaluated once at the very end.", exists=True, file_okay=False
    ),
    cache_dir: Path | None = _cache_dir_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode without reading or writing a cache."),
    limit_per_class: int | None = typer.Option(
        None, "--limit-per-class", min=1, help="Use at most N images per class (smoke runs)."
    ),
) -> None:
    """Train a model on DATA and write it to OUT (SavedModel + model.json + reports/).

    Re-running the same command resumes: finished stages are skipped and an interrupted stage
    continues from its last completed epoch. Everything printed is also logged to OUT/reports/train.log.
    """
    from training.recipe import RECIPES

    if arch not in RECIPES:
        raise _fail(f"--arch must be one of {', '.join(RECIPES)}")
    if arch != "resnet50" and weights != "none":
        raise _fail("--weights applies to --arch resnet50 only")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise _fail(f"--weights {weights}: not 'imagenet', 'none' or an existing weights file")
    cache = None if no_cache else _decode_cache(cache_dir)
    _quiet_tensorflow()
    with tee_output(out / "reports" / "train.log"):
        from training.train import train

        try:
            card = train(
                data,
                out,
                arch=arch,
                weights=weights,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                input_size=input_size,
                mixup_alpha=mixup,
                test_dir=test,
                cache_dir=cache,
                limit_per_class=limit_per_class,
            )
        except ValueError as exc:  # bad data folder, empty class, ...: a message, not a traceback
            raise _fail(str(exc)) from None
        metrics = card.metrics
        typer.echo(
            f"\nwrote {out} ({card.architecture}, {card.training.get('parameters', '?')} parameters, "
            f"{card.training.get('wall_seconds', '?')} s)"
        )
        typer.echo(
            f"validation accuracy {metrics['val_accuracy']:.4f}, loss {metrics['val_loss']:.4f} "
            f"on {metrics['val_n']} leak-free validation scans"
        )
        if "test_accuracy" in metrics:
            typer.echo(
                f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} "
                f"on {metrics['test_n']} scans of {test}"
            )


def _resolve(model: Path | None) -> Any:
    from brainscan.modelrepo import resolve_model

    settings = get_settings()
    if model is None:  # what the workers serve
        return resolve_model(settings.model_dir, settings.model_name, settings.model_version)
    return resolve_model(model)


def evaluate_command(
    data: Path = typer.Option(
        ..., "--data", help="Labelled folder: <data>/<class>/<image>.", exists=True, file_okay=False
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model folder (or repository); default: the model the workers serve."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per model call."),
    model_format: str | None = typer.Option(
        None,
        "--format",
        help="savedmodel, tflite or tflite-int8; default BRAINSCAN_MODEL_FORMAT, else the card's.",
    ),
    cache_dir: Path | None = _cache_dir_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode without reading or writing a cache."),
    ood: Path | None = typer.Option(
        None,
        "--ood",
        exists=True,
        file_okay=False,
        help="Images the model is not for (sub-folders = families): adds the scope detector's AUROC "
        "against DATA and the share flagged.",
    ),
) -> None:
    """Accuracy, loss, per-class precision/recall/F1 and the confusion matrix of a model on DATA.

    Scans are decoded by the serving code and scored by the workers' loader (brainscan.runtime),
    flags and calibrated probabilities included: ECE and NLL before/after the model's temperature,
    the shares flagged, and the accuracy of the unflagged scans.
    """
    from brainscan.modelrepo import ModelNotFound

    _quiet_tensorflow()
    from brainscan.runtime import load_scorer
    from training.data import load_scanset
    from training.evaluate import classification_report, evaluate_scorer

    try:
        ref = _resolve(model)
        scorer = load_scorer(ref, model_format=model_format)
    except ModelNotFound as exc:
        raise _fail(str(exc)) from None
    card = scorer.card
    cache = None if no_cache else _decode_cache(cache_dir)
    try:
        scans = load_scanset(data, card.input_spec, cache)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    metrics = evaluate_scorer(scorer, scans.pixels, scans.labels, card.preprocessing, batch_size)
    typer.echo(f"{card.name}/{card.version} ({scorer.variant}, {ref.path}) on {data}: {metrics['n']} scans\n")
    typer.echo(classification_report(metrics))
    _evaluate_trust(scorer, data, scans, metrics, ood, batch_size)
    if card.data_fingerprint and card.data_fingerprint == scans.fingerprint:
        typer.echo(
            "note: this is the folder the model was trained on (same data fingerprint): these figures "
            "include its training images; its held-out figure is the card's val_accuracy.",
            err=True,
        )
    if json_out:
        _write_evaluation(json_out, metrics, scorer, ref.path, data, scans.fingerprint)


def _evaluate_trust(
    scorer: Any, data: Path, scans: Any, metrics: dict[str, Any], ood: Path | None, batch_size: int
) -> None:
    """Flags and calibration, as the workers serve them (and the OOD folder's AUROC): printed, kept."""
    from training.evaluate import evaluate_ood, flag_metrics, folder_findings, judge_pixels

    card = scorer.card
    findings = folder_findings(scorer, data, scans.paths)
    verdicts, raw = judge_pixels(scorer, scans.pixels, card.preprocessing, findings, batch_size)
    metrics["trust"] = flag_metrics(verdicts, raw, scans.labels)
    trust = metrics["trust"]
    typer.echo(
        f"calibration: ECE {trust['ece_before']:.4f} -> {trust['ece_after']:.4f}, NLL "
        f"{trust['nll_before']:.4f} -> {trust['nll_after']:.4f} (temperature {scorer.trust.temperature:.3f})"
    )
    typer.echo(
        f"flags: out_of_scope {trust['out_of_scope_share']:.2%}, uncertain {trust['uncertain_share']:.2%}, "
        f"unflagged {trust['unflagged_share']:.2%} at accuracy {trust['unflagged_accuracy'] or 0:.4f}"
    )
    if ood is not None:
        metrics["ood"] = evaluate_ood(scorer, verdicts, ood, batch_size)
        for family, row in [*metrics["ood"]["families"].items(), ("all", metrics["ood"]["overall"])]:
            typer.echo(
                f"ood {family}: {row['n']} images, flagged or refused {row['flagged_or_refused_share']:.2%}, "
                f"AUROC {row['auroc'] or 0:.4f} (max-softmax {row['auroc_max_softmax'] or 0:.4f})"
            )


def _write_evaluation(
    json_out: Path, metrics: dict[str, Any], scorer: Any, model_path: Path, data: Path, fingerprint: str
) -> None:
    card = scorer.card
    report = {
        **metrics,
        "model": {
            "name": card.name,
            "version": card.version,
            "path": str(model_path),
            "format": scorer.variant,
        },
        "data": str(data),
        "data_fingerprint": fingerprint,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"wrote {json_out}")


def export_command(
    model: Path = typer.Option(
        ..., "--model", help="Model folder: models/<name>/<version>.", exists=True, file_okay=False
    ),
    tflite: bool = typer.Option(False, "--tflite", help="Write model.tflite (float)."),
    int8: bool = typer.Option(False, "--int8", help="Write model-int8.tflite (full-integer quantization)."),
    representative: Path | None = typer.Option(
        None,
        "--representative",
        exists=True,
        file_okay=False,
        help="Training scans to calibrate int8 on: <dir>/<class>/<image>.",
    ),
    samples: int = typer.Option(200, "--samples", min=1, help="Calibration scans for --int8."),
    data: Path | None = typer.Option(
        None,
        "--data",
        exists=True,
        file_okay=False,
        help="The training folder: measure accuracy on the model's validation split.",
    ),
    cache_dir: Path | None = _cache_dir_option(),
) -> None:
    """Check MODEL's SavedModel (signature 'serve') and card; write and check its TFLite variants."""
    from brainscan.modelrepo import ModelNotFound

    _quiet_tensorflow()
    from training.export import export_variants

    if int8 and representative is None:
        raise _fail("--int8 needs --representative DIR (real training scans to calibrate on)")
    try:
        card, results = export_variants(
            model,
            tflite=tflite,
            int8=int8,
            representative_dir=representative,
            samples=samples,
            data_dir=data,
            cache_dir=_decode_cache(cache_dir),
        )
    except (ModelNotFound, ValueError) as exc:
        raise _fail(str(exc)) from None
    for note in results["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(
        f"{card.name}/{card.version}: SavedModel ok (signature 'serve', input "
        f"{card.input_size[0]}x{card.input_size[1]}x{card.channels}, preprocessing {card.preprocessing})"
    )
    if "savedmodel_val_accuracy" in results:
        typer.echo(
            f"  savedmodel   val_accuracy {results['savedmodel_val_accuracy']:.4f} ({results['validation']})"
        )
    for variant, entry in results["variants"].items():
        line = (
            f"  {variant:<12} {entry['file']} {entry['bytes'] / 1e6:.1f} MB, max |{variant} - SavedModel| = "
            f"{entry['max_abs_diff']:.2e}, top-1 agreement {entry['top1_agreement']:.3f} "
            f"on {results['compared_on']}"
        )
        if "val_accuracy" in entry:
            line += f", val_accuracy {entry['val_accuracy']:.4f}"
        typer.echo(line)
    if not results["variants"]:
        typer.echo("  (no --tflite/--int8: nothing else written)")


def calibrate_command(
    model: Path = typer.Option(
        ..., "--model", help="Model folder: models/<name>/<version>.", exists=True, file_okay=False
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        exists=True,
        file_okay=False,
        help="The folder the model was trained on: its training split fits the detector, its "
        "validation split (reports/split.json) the thresholds and temperature.",
    ),
    cache_dir: Path | None = _cache_dir_option(),
) -> None:
    """Fit MODEL's scope detector, temperature and flag thresholds; write trust.npz and the card."""
    from brainscan.modelrepo import ModelNotFound

    _quiet_tensorflow()
    from training.calibrate import calibrate_model, describe

    try:
        card = calibrate_model(model, data, _decode_cache(cache_dir))
    except (ModelNotFound, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{card.name}/{card.version}: calibrated ({model}/model.json, reports/reliability.png)")
    for line in describe(card):
        typer.echo(f"  {line}")


def ensemble_command(
    members: list[Path] = typer.Option(
        ...,
        "--member",
        exists=True,
        file_okay=False,
        help="A member's model folder (`brainscan train --seed N`); give two or more.",
    ),
    out: Path = typer.Option(..., "--out", help="Model folder to write: models/<name>/<version>."),
    data: Path = typer.Option(
        ..., "--data", exists=True, file_okay=False, help="The folder the members were trained on."
    ),
    cache_dir: Path | None = _cache_dir_option(),
) -> None:
    """Serve MEMBERS as one model (their probabilities averaged): evaluated on their shared
    validation split, exported (SavedModel with Grad-CAM signatures) and calibrated."""
    from brainscan.modelrepo import ModelNotFound

    _quiet_tensorflow()
    from training.calibrate import describe
    from training.ensemble import build_ensemble

    try:
        card = build_ensemble(members, out, data, _decode_cache(cache_dir))
    except (ModelNotFound, ValueError) as exc:
        raise _fail(str(exc)) from None
    metrics = card.metrics
    typer.echo(
        f"wrote {out} ({card.architecture}, {len(members)} members, {card.training['parameters']} parameters)"
    )
    typer.echo(
        f"validation accuracy {metrics['val_accuracy']:.4f}, loss {metrics['val_loss']:.4f} "
        f"on {metrics['val_n']} leak-free validation scans"
    )
    for line in describe(card):
        typer.echo(f"  {line}")


def audit_command(
    folder: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="Folder of images (<class>/ subfolders)."
    ),
    against: Path | None = typer.Option(
        None,
        "--against",
        exists=True,
        file_okay=False,
        help="Also list this folder's images that have a copy in FOLDER.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report (with examples) here."),
    threshold: int | None = typer.Option(
        None, "--threshold", min=0, max=256, help="Near-duplicate dHash distance, in bits of 256."
    ),
) -> None:
    """Exact (SHA-256) and near (perceptual dHash) duplicates within FOLDER, and across to --against."""
    from training.audit import NEAR_DUPLICATE_BITS, audit_folder

    try:
        report = audit_folder(
            folder, against, max_bits=NEAR_DUPLICATE_BITS if threshold is None else threshold
        )
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    typer.echo(report.summary())
    for example in report.examples[:5]:
        if "files" in example:
            kind = "exact" if example["exact"] else "near"
            typer.echo(
                f"  e.g. {kind}: {', '.join(example['files'][:4])}"
                + (f" (+{len(example['files']) - 4})" if len(example["files"]) > 4 else "")
                + (f"  labels {example['labels']}" if len(example["labels"]) > 1 else "")
            )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.to_json() + "\n")
        typer.echo(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("export")(export_command)
    app.command("calibrate")(calibrate_command)
    app.command("ensemble")(ensemble_command)
    app.command("audit")(audit_command)
