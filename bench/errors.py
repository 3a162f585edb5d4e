"""Which validation scans models misread: per model, their average, and the errors they share (issue 12).

    .venv/bin/python bench/errors.py --model models/brainscan-compact/3 --model runs/224px \
        --data ../shared/data/brain-tumor-mri/Training [--without-recalibration] [--flip] [--list]

Every model is scored on the leak-free validation split its ``reports/split.json`` names (all of them
must name the same one: seeded runs and ``--input-size`` runs of one recipe do), each through the
serving path at its own input spec (``brainscan.imaging.load_pixels`` then ``normalize``, which is
``prepare``; ``brainscan.runtime.load_scorer``).
Scored as SavedModels unless ``--format`` names a variant every model has.
Prints accuracy, errors and glioma recall per model, for the mean of their probabilities (models of
different input sizes can be averaged here, though ``brainscan ensemble`` cannot serve them as one),
and how many errors every model shares: errors that all runs make are not run-to-run noise.

``--without-recalibration``: for a run folder that still holds ``checkpoints/best.weights.h5`` (a
training output before its checkpoints are deleted), also the best epoch's weights as they were, without
the BatchNorm recalibration ``brainscan train`` applies after the exponential average — so whether that
step helps can be judged across seeds. ``--flip``: also each model's mean over the scan and its
left-right mirror (test-time flip; the service does not do it). Figures, never assertions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # robustness.py
from robustness import validation_files

from brainscan import CLASSES
from brainscan.imaging import load_pixels, normalize
from brainscan.runtime import load_scorer, predict_in_batches

GLIOMA = CLASSES.index("glioma")


def summary(name: str, probabilities: np.ndarray, labels: np.ndarray) -> str:
    predicted = probabilities.argmax(axis=1)
    gliomas = labels == GLIOMA
    errors = int((predicted != labels).sum())
    return (
        f"{name}: accuracy {100 * (predicted == labels).mean():.2f}%, errors {errors}, "
        f"glioma recall {(predicted[gliomas] == GLIOMA).mean():.3f}"
    )


def without_recalibration(model: Path, pixels: np.ndarray) -> np.ndarray:
    """Probabilities of the best epoch's checkpointed weights for uint8 ``pixels`` (as training holds
    them), float32, BatchNorm as trained."""
    from brainscan.modelrepo import ModelCard
    from training.recipe import recipe_from_record
    from training.train import build_model, predict_pixels, training_model, with_input_normalisation

    card = ModelCard.model_validate_json((model / "model.json").read_text())
    recipe = recipe_from_record(card.training["recipe"])
    served, _ = build_model(recipe, None)
    trainable = training_model(with_input_normalisation(served, recipe), recipe, seed=recipe.seed)
    trainable.load_weights(str(model / "checkpoints" / "best.weights.h5"))
    return predict_pixels(served, pixels, recipe)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, action="append", required=True, help="model or run folder")
    parser.add_argument("--data", type=Path, required=True, help="the folder the models were trained on")
    parser.add_argument("--format", default="savedmodel", help="savedmodel | tflite | tflite-int8")
    parser.add_argument("--without-recalibration", action="store_true")
    parser.add_argument(
        "--flip",
        action="store_true",
        help="also each model averaged with its left-right mirror (test-time flip)",
    )
    parser.add_argument("--list", action="store_true", help="print every misread scan")
    args = parser.parse_args(argv)

    paths, labels = validation_files(args.model[0], args.data)
    for model in args.model[1:]:
        if validation_files(model, args.data)[0] != paths:
            raise SystemExit(f"{model}: validated on other scans than {args.model[0]}")
    files = [p.read_bytes() for p in paths]
    print(f"{len(files)} leak-free validation scans of {args.data}", file=sys.stderr)

    scored: dict[str, np.ndarray] = {}
    for model in args.model:
        scorer = load_scorer(model, model_format=args.format)
        spec = scorer.card.input_spec
        # Decoded once: ``brainscan.imaging.prepare`` is exactly this decode, then ``normalize``.
        pixels = np.stack([load_pixels(data, spec) for data in files])
        tensors = normalize(pixels, spec.preprocessing).astype(np.float32)
        scored[str(model)] = predict_in_batches(scorer, tensors)
        if args.flip:  # the mirror of the normalised tensor: what the mirrored scan would give
            mirrored = predict_in_batches(scorer, np.ascontiguousarray(tensors[:, :, ::-1]))
            scored[f"{model} + mirror (test-time flip)"] = (scored[str(model)] + mirrored) / 2
        if args.without_recalibration and (model / "checkpoints" / "best.weights.h5").is_file():
            scored[f"{model} (without BatchNorm recalibration)"] = without_recalibration(model, pixels)
    for name, probabilities in scored.items():
        print(summary(name, probabilities, labels))
    exported = [scored[str(m)] for m in args.model]
    if len(exported) > 1:
        print(summary("mean of the exported models", np.mean(exported, axis=0), labels))
        wrong = [set(np.flatnonzero(p.argmax(axis=1) != labels)) for p in exported]
        print(f"errors all {len(exported)} exported models make: {len(set.intersection(*wrong))}")
    if args.list:
        for name, probabilities in scored.items():
            print(f"\n{name}")
            for i in np.flatnonzero(probabilities.argmax(axis=1) != labels):
                guess, confidence = CLASSES[int(probabilities[i].argmax())], probabilities[i].max()
                print(
                    f"  {paths[i].relative_to(args.data)}: {CLASSES[labels[i]]} -> {guess} {confidence:.2f}"
                )


if __name__ == "__main__":
    main()
