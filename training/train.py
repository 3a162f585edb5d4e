"""``brainscan train``: from a folder of labelled scans to a served model, top to bottom.

1. Decode every scan once with the serving code (cached), and split off a stratified validation set
   in which exact and near-duplicate groups never straddle the split.
2. Build the architecture and train it, stage by stage, with augmentation inside the training graph,
   checkpointing the best epoch by validation accuracy and a resumable backup every epoch.
3. Restore the best epoch, evaluate it on the validation split (and once on a test folder, if given),
   export the SavedModel with its ``model.json`` card, and write the reports.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from brainscan import CLASSES
from brainscan.imaging import InputSpec, normalize
from brainscan.modelrepo import ModelCard
from training.data import ScanSet, class_counts, leak_free_split, load_scanset
from training.recipe import (
    RECIPES,
    Recipe,
    bf16_support,
    make_loss,
    make_optimizer,
    training_model,
    with_overrides,
)


def input_spec(recipe: Recipe) -> InputSpec:
    return InputSpec(recipe.input_size, recipe.input_size, recipe.channels, recipe.preprocessing, recipe.crop)


def to_dataset(pixels: np.ndarray, labels: np.ndarray, recipe: Recipe, shuffle: bool, seed: int):  # type: ignore[no-untyped-def]
    """uint8 pixels -> batches of (float pixels, one-hot labels). Normalisation for the ResNet50 recipe
    happens in the training graph after augmentation, so here pixels stay in the 0-255 range."""
    import tensorflow as tf

    one_hot = np.eye(len(CLASSES), dtype=np.float32)[labels]
    dataset = tf.data.Dataset.from_tensor_slices((pixels, one_hot))
    if shuffle:
        dataset = dataset.shuffle(len(pixels), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(recipe.batch_size)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle and recipe.mixup_alpha:
        dataset = dataset.map(
            lambda x, y: mix_up(x, y, recipe.mixup_alpha), num_parallel_calls=tf.data.AUTOTUNE
        )
    return dataset.prefetch(tf.data.AUTOTUNE)


def mix_up(pixels, labels, alpha: float):  # type: ignore[no-untyped-def]
    """A batch blended with itself reversed: scan i and scan n-1-i, weighted by a Beta(alpha, alpha)
    draw per scan, labels by the same weight. Before the augmentation layers, so both scans of a
    blend share one geometry and one intensity change, as a single scan would."""
    import tensorflow as tf

    batch = tf.shape(pixels)[0]
    # Beta(a, a) as the ratio of two Gamma(a) draws (tf has no Beta sampler).
    first, second = tf.random.gamma([batch], alpha), tf.random.gamma([batch], alpha)
    weight = first / (first + second)
    pixel_weight = tf.reshape(weight, [-1, 1, 1, 1])
    label_weight = tf.reshape(weight, [-1, 1])
    mixed_pixels = pixel_weight * pixels + (1.0 - pixel_weight) * tf.reverse(pixels, axis=[0])
    mixed_labels = label_weight * labels + (1.0 - label_weight) * tf.reverse(labels, axis=[0])
    return mixed_pixels, mixed_labels


def build_model(recipe: Recipe, weights: str | None, precision: str = "float32"):  # type: ignore[no-untyped-def]
    """(served model, ResNet50 backbone or None), its layers computing in ``precision`` (a Keras dtype
    policy; variables are float32 either way). The served model takes ``preprocessing``-ready input."""
    import keras

    saved_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        return _build_architecture(recipe, weights)
    finally:
        keras.mixed_precision.set_global_policy(saved_policy)


def _build_architecture(recipe: Recipe, weights: str | None):  # type: ignore[no-untyped-def]
    from training.architectures import build_compact, build_resnet50

    if recipe.arch == "resnet50":
        backbone_weights = None if weights in (None, "none") else weights
        return build_resnet50(backbone_weights, recipe.input_size)
    if weights not in (None, "none"):
        raise ValueError("--weights applies to the resnet50 architecture only")
    # preprocessing "none": the network scales uint8-range pixels itself; "head-zscore": input as is.
    rescale = recipe.preprocessing == "none"
    return build_compact(recipe.input_size, recipe.channels, recipe.compact_shape, rescale), None


def with_input_normalisation(model, recipe: Recipe):  # type: ignore[no-untyped-def]
    """For training: raw 0-255 pixels in, ``normalize`` (the serving function) applied in the graph."""
    import keras

    if recipe.preprocessing == "none":
        return model
    inputs = keras.Input(model.input_shape[1:], name="raw_pixels")
    normalised = keras.layers.Lambda(lambda x: normalize(x, recipe.preprocessing), name="normalize")(inputs)
    return keras.Model(inputs, model(normalised), name=f"{model.name}_raw")


def predict_pixels(model, pixels: np.ndarray, recipe: Recipe, batch_size: int = 64) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Probabilities for uint8 pixels, through exactly the serving preprocessing."""
    outputs = []
    for start in range(0, len(pixels), batch_size):
        batch = normalize(pixels[start : start + batch_size], recipe.preprocessing)
        outputs.append(np.asarray(model(batch.astype(np.float32), training=False)))
    return np.concatenate(outputs) if outputs else np.zeros((0, len(CLASSES)), np.float32)


def train(
    data_dir: Path,
    out_dir: Path,
    arch: str = "compact",
    weights: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    input_size: int | None = None,
    mixup_alpha: float | None = None,
    test_dir: Path | None = None,
    cache_dir: Path | None = Path("var/cache"),
    name: str | None = None,
    version: str | None = None,
    limit_per_class: int | None = None,
    verbose: int | str = "auto",
    extra_callbacks: list | None = None,
) -> ModelCard:
    import keras

    started = time.monotonic()
    recipe = with_overrides(
        RECIPES[arch],
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        input_size=input_size,
        mixup_alpha=mixup_alpha,
    )
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out_dir / "reports").mkdir(parents=True, exist_ok=True)
    claim_checkpoints(out_dir, recipe)
    precision = choose_precision(recipe)  # before seeding: its timing run draws random numbers
    keras.utils.set_random_seed(recipe.seed)

    # 1. Data: decoded once by the serving code, split without leaks.
    train_set, val_set = load_split(Path(data_dir), recipe, cache_dir, limit_per_class)
    # 2. Model and training, stage by stage, under that precision (float32 variables either way).
    model = fit_stages(
        recipe, precision, weights, train_set, val_set, out_dir, verbose, extra_callbacks or []
    )
    # 3. Best epoch -> evaluation -> export -> reports, in float32: served models never depend on bf16.
    finish(
        model,
        recipe,
        train_set,
        val_set,
        out_dir,
        data_dir=data_dir,
        weights=weights,
        precision=precision,
        test_dir=test_dir,
        cache_dir=cache_dir,
        name=name,
        version=version,
        started=started,
    )
    # 4. Trust (issue 11, training/calibrate.py): scope detector fitted on the training split, temperature
    #    and flag thresholds on the validation split; written beside the card.
    from training.calibrate import calibrate_model

    return calibrate_model(out_dir, Path(data_dir), cache_dir)


def claim_checkpoints(out_dir: Path, recipe: Recipe) -> None:
    """Checkpoints resume only the settings that wrote them: a re-run into ``out_dir`` with another
    seed, input size or schedule would otherwise continue the old run and record the new settings."""
    record = out_dir / "checkpoints" / "recipe.json"
    wanted = _jsonable(asdict(recipe))
    if record.exists():
        held = json.loads(record.read_text())
        changed = sorted(key for key in held.keys() | wanted.keys() if held.get(key) != wanted.get(key))
        if changed:
            raise ValueError(
                f"{out_dir} holds checkpoints of a run with other settings ({', '.join(changed)}): "
                "re-run with that run's options to resume it, or train into another --out"
            )
        return
    record.write_text(json.dumps(wanted, indent=1) + "\n")


def load_split(
    data_dir: Path, recipe: Recipe, cache_dir: Path | None, limit_per_class: int | None
) -> tuple[ScanSet, ScanSet]:
    """(train, validation) scans, decoded at the recipe's input spec; optionally the first N per class."""
    scans = load_scanset(data_dir, input_spec(recipe), cache_dir)
    if limit_per_class:
        keep = np.zeros(len(scans.labels), dtype=bool)
        for k in range(len(CLASSES)):
            keep[np.flatnonzero(scans.labels == k)[:limit_per_class]] = True
        scans = scans.subset(keep)
    train_set, val_set = leak_free_split(scans, recipe.validation_fraction, recipe.split_seed)
    print(
        f"data: {len(train_set.labels)} train / {len(val_set.labels)} validation scans "
        f"(duplicate groups kept on one side), fingerprint {scans.fingerprint}",
        file=sys.stderr,
    )
    return train_set, val_set


def choose_precision(recipe: Recipe, step_seconds=None) -> str:  # type: ignore[no-untyped-def]
    """The Keras dtype policy to train under: the recipe's, unless bfloat16 would be slower here.

    Where the CPU has AVX-512 BF16 but no AMX the answer depends on the CPU (a 2-core AMD EPYC:
    0.68 s per compact step in bfloat16 against 0.98 s in float32; a 2-core Intel Xeon: 0.71 s
    against 0.48 s), so a few steps of each decide (16 s on the Xeon, against ~70 min of training).
    """
    if recipe.precision != "mixed_bfloat16":
        return recipe.precision
    support = bf16_support()
    if support != "partial":
        return "mixed_bfloat16" if support == "native" else "float32"
    timed = {
        policy: (step_seconds or training_step_seconds)(recipe, policy)
        for policy in ("mixed_bfloat16", "float32")
    }
    chosen = min(timed, key=timed.__getitem__)
    print(
        "precision: AVX-512 BF16 without AMX, timed a training step: "
        + ", ".join(f"{policy} {seconds:.3f} s" for policy, seconds in timed.items())
        + f" -> {chosen}",
        file=sys.stderr,
    )
    return chosen


def training_step_seconds(recipe: Recipe, precision: str, steps: int = 3) -> float:
    """Seconds per training step of ``recipe``'s model under ``precision``, on random pixels."""
    import keras

    model, _ = build_model(recipe, None, precision)
    trainable = training_model(with_input_normalisation(model, recipe), recipe, seed=recipe.seed)
    trainable.compile(optimizer=keras.optimizers.Adam(), loss=make_loss(recipe))
    size, rng = recipe.input_size, np.random.default_rng(recipe.seed)
    pixels = rng.integers(0, 256, (recipe.batch_size, size, size, recipe.channels)).astype(np.float32)
    labels = np.eye(len(CLASSES), dtype=np.float32)[rng.integers(0, len(CLASSES), recipe.batch_size)]
    trainable.train_on_batch(pixels, labels)  # tracing and compilation are not what is compared
    started = time.perf_counter()
    for _ in range(steps):
        trainable.train_on_batch(pixels, labels)
    return (time.perf_counter() - started) / steps


def fit_stages(  # type: ignore[no-untyped-def]
    recipe: Recipe,
    precision: str,
    weights: str | None,
    train_set: ScanSet,
    val_set: ScanSet,
    out_dir: Path,
    verbose: int | str,
    extra_callbacks: list,
):
    """Train stage by stage (resuming finished stages), restore the best epoch; the float32 served model."""

    train_data = to_dataset(train_set.pixels, train_set.labels, recipe, shuffle=True, seed=recipe.seed)
    val_data = to_dataset(val_set.pixels, val_set.labels, recipe, shuffle=False, seed=recipe.seed)
    steps_per_epoch = int(np.ceil(len(train_set.labels) / recipe.batch_size))
    print(f"precision: {precision}", file=sys.stderr)
    model, backbone = build_model(recipe, weights, precision)
    trainable = training_model(with_input_normalisation(model, recipe), recipe, seed=recipe.seed)
    checkpoints = out_dir / "checkpoints"
    best_weights = checkpoints / "best.weights.h5"
    first_epoch = 0
    for stage_index, stage in enumerate(recipe.stages, start=1):
        # BackupAndRestore deletes its backup when a stage ends, so a finished stage leaves its final
        # weights here instead: a re-run resumes after it rather than training it again.
        stage_done = checkpoints / f"stage{stage_index}-done.weights.h5"
        if stage_done.exists():
            print(
                f"stage {stage_index}/{len(recipe.stages)}: finished in an earlier run, resuming after it",
                file=sys.stderr,
            )
            trainable.load_weights(str(stage_done))
            first_epoch += stage.epochs
            continue
        if backbone is not None:
            from training.architectures import set_resnet50_stage

            set_resnet50_stage(backbone, stage_index)
        trainable.compile(
            optimizer=make_optimizer(recipe, stage, steps_per_epoch),
            loss=make_loss(recipe),
            metrics=["accuracy"],
        )
        print(
            f"stage {stage_index}/{len(recipe.stages)}: {stage.epochs} epochs at learning rate "
            f"{stage.learning_rate:g}",
            file=sys.stderr,
        )
        trainable.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=first_epoch,
            epochs=first_epoch + stage.epochs,
            callbacks=stage_callbacks(recipe, stage_index, out_dir) + extra_callbacks,
            verbose=verbose,
        )
        trainable.save_weights(str(stage_done))
        first_epoch += stage.epochs

    if best_weights.exists():
        trainable.load_weights(str(best_weights))
    if precision != "float32":
        served, _ = build_model(recipe, weights)
        served.set_weights(model.get_weights())
        model = served
    return model


def stage_callbacks(recipe: Recipe, stage_index: int, out_dir: Path) -> list:
    """EMA swap, resumable backup, best-epoch checkpoint, CSV history and optional early stopping."""
    import keras

    checkpoints, reports = out_dir / "checkpoints", out_dir / "reports"
    callbacks: list = []
    if recipe.ema_momentum:
        # Validate and checkpoint the averaged weights: they are what gets exported.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks += [
        keras.callbacks.BackupAndRestore(str(checkpoints / f"backup-stage{stage_index}")),
        keras.callbacks.ModelCheckpoint(
            str(checkpoints / "best.weights.h5"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=_best_so_far(reports / "history.csv"),
        ),
        keras.callbacks.CSVLogger(str(reports / "history.csv"), append=True),
    ]
    if recipe.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=recipe.early_stopping_patience
            )
        )
    return callbacks


def recalibrate_batchnorm(model, pixels: np.ndarray, recipe: Recipe, batches: int = 50) -> None:  # type: ignore[no-untyped-def]
    """Recompute BatchNorm statistics for the weights the model holds now ("precise BN").

    The exported weights are an exponential moving average, but each BatchNorm layer's running
    statistics were gathered under the raw weights of the last steps. Re-estimating them under the
    averaged weights, as a plain mean over un-augmented training batches, removes that mismatch.
    """
    import keras

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    saved_momentum = [layer.momentum for layer in norms]
    order = np.random.default_rng(recipe.seed).permutation(len(pixels))
    size = recipe.batch_size * 2
    for step in range(1, min(batches, len(pixels) // size) + 1):
        for layer in norms:
            layer.momentum = 1.0 - 1.0 / step  # a running mean: batch k weighs 1/k
        batch = pixels[order[(step - 1) * size : step * size]].astype(np.float32)
        model(normalize(batch, recipe.preprocessing), training=True)
    for layer, momentum in zip(norms, saved_momentum, strict=True):
        layer.momentum = momentum


def finish(  # type: ignore[no-untyped-def]
    model,
    recipe: Recipe,
    train_set,
    val_set,
    out_dir: Path,
    *,
    data_dir: Path,
    weights: str | None,
    precision: str,
    test_dir: Path | None,
    cache_dir: Path | None,
    name: str | None,
    version: str | None,
    started: float,
) -> ModelCard:
    """The chosen weights -> BatchNorm recalibration -> evaluation -> SavedModel + card + reports."""
    from training.evaluate import classification_metrics
    from training.reports import plot_history, write_evaluation

    reports = out_dir / "reports"
    last_epoch_accuracy = _last_value(reports / "history.csv", "val_accuracy")
    if recipe.ema_momentum:
        recalibrate_batchnorm(model, train_set.pixels, recipe)
    val_metrics = classification_metrics(predict_pixels(model, val_set.pixels, recipe), val_set.labels)
    write_evaluation(val_metrics, reports, "validation", f"{recipe.arch} on the leak-free validation split")
    plot_history(reports / "history.csv", reports / "curves.png")
    metrics = {
        "val_accuracy": val_metrics["accuracy"],
        "val_loss": val_metrics["loss"],
        "val_n": val_metrics["n"],
        "val_accuracy_best_epoch_before_recalibration": _best_so_far(reports / "history.csv"),
        "val_accuracy_last_epoch": last_epoch_accuracy,
    }
    if test_dir:
        # Touched once, at the very end: never used to choose anything.
        test_scans = load_scanset(Path(test_dir), input_spec(recipe), cache_dir)
        test_metrics = classification_metrics(
            predict_pixels(model, test_scans.pixels, recipe), test_scans.labels
        )
        write_evaluation(test_metrics, reports, "test", f"{recipe.arch} on {test_dir}")
        metrics.update(
            test_accuracy=test_metrics["accuracy"], test_loss=test_metrics["loss"], test_n=test_metrics["n"]
        )

    from training.export import export_savedmodel

    export_savedmodel(model, out_dir)  # serve: output_0 (probabilities) + features (issue 11)
    # The same network as a Keras file: Grad-CAM (worker/gradcam.py) needs its inner feature maps,
    # which a SavedModel's restored functions do not expose.
    model.save(str(out_dir / "model.keras"))
    wall_seconds = round(time.monotonic() - started, 1)
    card = ModelCard(
        name=name or out_dir.parent.name,
        version=version or out_dir.name,
        classes=list(CLASSES),
        input_size=(recipe.input_size, recipe.input_size),
        channels=recipe.channels,
        preprocessing=recipe.preprocessing,  # type: ignore[arg-type]
        crop=recipe.crop,  # type: ignore[arg-type]
        architecture=recipe.arch,
        metrics=metrics,
        data_fingerprint=train_set.fingerprint,
        training={
            "data_dir": str(data_dir),
            "train_counts": class_counts(train_set.labels),
            "validation_counts": class_counts(val_set.labels),
            "recipe": _jsonable(asdict(recipe)),
            "weights": weights or "none",
            "precision": precision,
            "parameters": int(model.count_params()),
            "wall_seconds": wall_seconds,
            "machine": machine_name(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    card.write(out_dir)
    (reports / "split.json").write_text(json.dumps({"validation": val_set.paths}, indent=1) + "\n")
    return card


def machine_name() -> str:
    """What trained a model, for its card: CPU model, architecture, cores, system."""
    return f"{_cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _best_so_far(history_csv: Path) -> float | None:
    """On resume, the best validation accuracy already checkpointed, so it is not overwritten by worse."""
    value = _column(history_csv, "val_accuracy")
    return max(value) if value else None


def _last_value(history_csv: Path, column: str) -> float | None:
    value = _column(history_csv, column)
    return value[-1] if value else None


def _column(history_csv: Path, column: str) -> list[float]:
    import csv

    if not history_csv.exists():
        return []
    with open(history_csv) as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def _jsonable(value):  # type: ignore[no-untyped-def]
    return json.loads(json.dumps(value, default=str))
