"""``brainscan export``: write a model's SavedModel (with features), check it, and write its TFLite variants.

- ``export_savedmodel``: a Keras model -> SavedModel whose ``serve`` (and ``serving_default``)
  signature returns ``output_0`` (the probabilities, as the original contract) and ``features`` (the
  penultimate layer: the compact net's ``pool``, ResNet50's 512-wide dense layer), which the scope
  detector (``brainscan.trust``) reads from the same forward pass.

- ``model.tflite``: the float graph, converted from the SavedModel's ``serve`` signature. It must give
  the SavedModel's probabilities (``max_abs_diff`` in the card, typically ~1e-7).
- ``model-int8.tflite``: full-integer quantization (int8 weights, activations, input and output) for
  CPUs with VNNI. Activation ranges are calibrated on a representative set of real training scans,
  decoded through the serving preprocessing (``brainscan.imaging.prepare``), stratified by class and
  drawn deterministically; the model's own validation images (``reports/split.json``) are left out
  of calibration so that the int8 validation accuracy stays a held-out figure.

Both are recorded in the card's ``variants`` (file, size, agreement, accuracy when measured);
``brainscan.runtime.load_scorer(..., model_format="tflite" | "tflite-int8")`` serves them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from brainscan import CLASSES
from brainscan.heatmaps import GRADCAM_HEAD, GRADCAM_MAPS, GRADCAM_MAPS_OUTPUT
from brainscan.imaging import InputSpec, ScanError, prepare
from brainscan.modelrepo import ModelCard, ModelNotFound, ModelRef, read_card
from brainscan.runtime import (
    DEFAULT_VARIANT_FILES,
    Scorer,
    load_savedmodel,
    load_tflite,
    load_trust,
    predict_in_batches,
)
from brainscan.trust import FEATURES_OUTPUT
from training.audit import list_images
from training.data import validation_paths


def feature_layer(model: Any) -> tuple[str, Any]:
    """(name, symbolic output) of the layer whose output feeds the classifier: the scope features.

    The compact net's global average pooling ``pool``; otherwise the input of the final Dense layer
    (ResNet50's 512-wide dense layer, through a Dropout that is the identity when serving).
    """
    import keras

    try:
        pool = model.get_layer("pool")
        return pool.name, pool.output
    except ValueError:
        pass
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(f"model {model.name}: its last layer is not Dense; cannot find its features")
    source = head.input
    # Step back over a Dropout (identity at inference) to name the layer that computes the features.
    producer = source._keras_history.operation if hasattr(source, "_keras_history") else None
    if isinstance(producer, keras.layers.Dropout):
        source = producer.input
        producer = source._keras_history.operation
    return getattr(producer, "name", "penultimate"), source


def gradcam_map(model: Any) -> tuple[str, Any] | None:
    """(name, symbolic output) of the feature map Grad-CAM explains from the SavedModel alone: the
    spatial map the ``pool`` layer averages (compact nets, ensembles); None where there is none."""
    try:
        maps = model.get_layer("pool").input
    except ValueError:
        return None
    if len(maps.shape) != 4 or (maps.shape[1] or 0) < 2 or (maps.shape[2] or 0) < 2:
        return None  # a 1x1 map explains nothing
    return maps._keras_history.operation.name, maps


def export_savedmodel(model: Any, folder: Path) -> Path:
    """Write ``model`` as a SavedModel serving ``output_0`` (probabilities) and ``features``.

    The input keeps the model's own name (``pixels``, ``keras_tensor``), so the card-less original's
    contract (``keras_tensor`` in, ``output_0`` out) still holds for a ResNet50 export. Where the model
    has a ``gradcam_map``, two more signatures split it there, so that Grad-CAM needs no Keras file
    (``worker/gradcam.py``): ``gradcam_maps`` (pixels -> ``maps``) and ``gradcam_head`` (``maps`` ->
    ``output_0``).
    """
    import keras
    import tensorflow as tf

    _, features = feature_layer(model)
    served = keras.Model(model.inputs, {"output_0": model.outputs[0], FEATURES_OUTPUT: features})
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name=model.inputs[0].name)
    archive = keras.export.ExportArchive()
    # No ``archive.track(served)``: the endpoint's own variables are saved without it, and tracking
    # the model as well stores every weight a second time (keras-team/keras#23553), doubling the
    # file and the variable memory of every process that loads it.

    def serve(x):  # type: ignore[no-untyped-def]
        return served(x, training=False)

    for endpoint in ("serve", "serving_default"):
        archive.add_endpoint(name=endpoint, fn=serve, input_signature=[spec])
    explained = gradcam_map(model)
    if explained is not None:
        _, maps = explained
        to_maps = keras.Model(model.inputs, maps)
        from_maps = keras.Model(maps, model.outputs[0])

        def pixels_to_maps(x):  # type: ignore[no-untyped-def]
            return {GRADCAM_MAPS_OUTPUT: to_maps(x, training=False)}

        def maps_to_probabilities(m):  # type: ignore[no-untyped-def]
            return {"output_0": from_maps(m, training=False)}

        maps_spec = tf.TensorSpec([None, *maps.shape[1:]], tf.float32, name=GRADCAM_MAPS_OUTPUT)
        archive.add_endpoint(name=GRADCAM_MAPS, fn=pixels_to_maps, input_signature=[spec])
        archive.add_endpoint(name=GRADCAM_HEAD, fn=maps_to_probabilities, input_signature=[maps_spec])
    archive.write_out(str(folder), verbose=False)
    return Path(folder)


def check_savedmodel(model_dir: Path) -> tuple[ModelRef, list[str]]:
    """The model folder's ref after checking its SavedModel serves ``serve``; notes on what was fixed.

    A card-less folder (the original project's export) gets the card of the contract it is served
    under, so that its TFLite variants can be recorded.
    """
    import tensorflow as tf

    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").is_file():
        raise ModelNotFound(f"{model_dir} holds no saved_model.pb: train one with `brainscan train`")
    notes = []
    card = read_card(model_dir)
    module = tf.saved_model.load(str(model_dir))
    if "serve" not in module.signatures:
        raise ModelNotFound(
            f"{model_dir}: the SavedModel has no 'serve' signature (has {list(module.signatures)}); "
            "re-export it from Keras with `model.export(folder)`"
        )
    _, kwargs = module.signatures["serve"].structured_input_signature
    (spec,) = kwargs.values()
    shape = tuple(spec.shape)[1:]
    expected = (*card.input_size, card.channels)
    if shape != expected:
        raise ModelNotFound(f"{model_dir}: the SavedModel takes {shape}, its card says {expected}")
    if card.card_less:
        card = card.model_copy(update={"card_less": False})
        notes.append(
            "no model.json: wrote the original project's contract (224x224 RGB, resnet50 preprocessing)"
        )
        card.write(model_dir)
    return ModelRef(model_dir, card), notes


def representative_inputs(
    data_dir: Path,
    spec: InputSpec,
    samples: int,
    exclude: set[str] | frozenset[str] = frozenset(),
    seed: int = 0,
) -> np.ndarray:
    """``samples`` scans of ``data_dir/<class>/``, balanced across classes, as float32 model input."""
    images = [
        (p, c)
        for p, c in list_images(Path(data_dir))
        if c in CLASSES and str(p.relative_to(data_dir)) not in exclude
    ]
    if not images:
        raise ValueError(f"{data_dir}: no images under <class>/ folders for the representative set")
    by_class: dict[str, list[Path]] = {}
    for path, label in images:
        by_class.setdefault(label, []).append(path)
    rng = random.Random(seed)
    for paths in by_class.values():
        rng.shuffle(paths)
    chosen: list[Path] = []
    # Round-robin over classes: every class is calibrated even when ``samples`` is small.
    while len(chosen) < samples and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < samples:
                chosen.append(by_class[label].pop())
    inputs = []
    for path in chosen:
        try:
            inputs.append(prepare(path.read_bytes(), spec))
        except ScanError:
            continue  # a broken file calibrates nothing; the others still do
    if not inputs:
        raise ValueError(f"{data_dir}: none of the chosen scans decodes")
    return np.stack(inputs).astype(np.float32)


def convert_tflite(model_dir: Path, out_file: Path, representative: np.ndarray | None = None) -> Path:
    """SavedModel (``serve``) -> TFLite file: float, or full-integer int8 when ``representative`` is given."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(model_dir), signature_keys=["serve"])
    if representative is not None:

        def calibration():  # type: ignore[no-untyped-def]
            for scan in representative:
                yield [scan[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration
        # Full-integer: any op without an int8 kernel fails the conversion instead of silently
        # staying float, and the input/output are int8 too (load_scorer quantizes them).
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    flatbuffer = converter.convert()
    out_file = Path(out_file)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_bytes(flatbuffer)
    tmp.replace(out_file)  # a worker never loads half a file
    return out_file


def compare(reference: Scorer, other: Scorer, inputs: np.ndarray, batch_size: int = 16) -> dict[str, Any]:
    """How far ``other``'s probabilities are from ``reference``'s on ``inputs``."""
    expected = predict_in_batches(reference, inputs, batch_size)
    got = predict_in_batches(other, inputs, batch_size)
    return {
        "max_abs_diff": float(np.abs(expected - got).max()) if len(inputs) else 0.0,
        "top1_agreement": float((expected.argmax(1) == got.argmax(1)).mean()) if len(inputs) else 1.0,
        "compared_on": len(inputs),
    }


def flag_agreement(
    reference: Scorer, other: Scorer, inputs: np.ndarray, batch_size: int = 16
) -> dict[str, Any]:
    """Share of ``inputs`` whose flag (and label) ``other`` serves as ``reference`` does, trust applied."""
    expected, got = [], []
    for start in range(0, len(inputs), batch_size):
        expected += reference.judge(inputs[start : start + batch_size])
        got += other.judge(inputs[start : start + batch_size])
    same = [(a.flag, a.label) == (b.flag, b.label) for a, b in zip(expected, got, strict=True)]
    return {
        "flag_agreement": float(np.mean(same)) if same else 1.0,
        "out_of_scope_share": float(np.mean([v.flag == "out_of_scope" for v in got])) if got else 0.0,
    }


def export_variants(
    model_dir: Path,
    tflite: bool = False,
    int8: bool = False,
    representative_dir: Path | None = None,
    samples: int = 100,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    compare_on: int = 16,
    num_threads: int | None = None,
) -> tuple[ModelCard, dict[str, Any]]:
    """Check the SavedModel, write the asked-for TFLite variants, measure them; returns (card, results)."""
    ref, notes = check_savedmodel(Path(model_dir))
    card = ref.card
    spec = card.input_spec
    saved = load_savedmodel(ref.path, card)
    saved.trust = load_trust(saved)
    results: dict[str, Any] = {"notes": notes, "variants": {}}

    if int8 and representative_dir is None:
        raise ValueError("--int8 needs --representative DIR: real training scans to calibrate on")
    exclude = validation_paths(ref.path, required=False)
    sample_dir = representative_dir or data_dir
    if sample_dir is not None:
        probe = representative_inputs(sample_dir, spec, compare_on, exclude=set(), seed=1)
        results["compared_on"] = f"{len(probe)} scans of {sample_dir}"
    else:
        # No scans at hand: compare on random pixels in the model's input range (still a real check
        # of the conversion, just not of the data's distribution).
        pixels = np.random.default_rng(0).integers(0, 256, (compare_on, *spec_shape(spec))).astype(np.float32)
        from brainscan.imaging import normalize

        probe = normalize(pixels, spec.preprocessing).astype(np.float32)
        results["compared_on"] = f"{len(probe)} random images"

    validation = _validation_scans(ref, data_dir, cache_dir) if data_dir is not None else None
    if validation is not None:
        results["validation"] = validation["description"]
        saved_metrics = _evaluate(saved, validation["scans"], card)
        results["savedmodel_val_accuracy"] = saved_metrics["accuracy"]

    wanted = [("tflite", None)] if tflite else []
    if int8:
        assert representative_dir is not None
        calibration = representative_inputs(representative_dir, spec, samples, exclude=exclude)
        wanted.append(("tflite-int8", calibration))
    for variant, calibration in wanted:
        out_file = ref.path / DEFAULT_VARIANT_FILES[variant]
        convert_tflite(ref.path, out_file, calibration)
        scorer = load_tflite(out_file, card, num_threads, variant)
        scorer.trust = load_trust(scorer)  # refuses a file without the features the detector needs
        entry: dict[str, Any] = {"file": out_file.name, "bytes": out_file.stat().st_size}
        entry.update(compare(saved, scorer, probe))
        if calibration is not None:
            entry["calibration"] = f"{len(calibration)} scans of {representative_dir}, serving preprocessing"
        if validation is not None:
            metrics = _evaluate(scorer, validation["scans"], card)
            entry["val_accuracy"] = metrics["accuracy"]
            entry["val_loss"] = metrics["loss"]
            entry["savedmodel_val_accuracy"] = results["savedmodel_val_accuracy"]
            entry["validation"] = validation["description"]
            if card.trust is not None:  # flags as served, against the SavedModel's, on validation
                pixels = validation["scans"].pixels
                from brainscan.imaging import normalize

                inputs = np.asarray(normalize(pixels, spec.preprocessing), dtype=np.float32)
                entry["validation_flags"] = flag_agreement(saved, scorer, inputs)
        card.variants[variant] = entry
        if variant == "tflite":
            card.tflite_file = out_file.name
        results["variants"][variant] = entry
    card.write(ref.path)
    return card, results


def spec_shape(spec: InputSpec) -> tuple[int, int, int]:
    return spec.height, spec.width, spec.channels


def _validation_scans(ref: ModelRef, data_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
    """The model's own validation split of ``data_dir`` (``reports/split.json``), else all of it."""
    from training.data import load_scanset

    scans = load_scanset(Path(data_dir), ref.card.input_spec, cache_dir)
    validation = validation_paths(ref.path, required=False)
    if validation:
        mask = np.array([p in validation for p in scans.paths])
        if mask.any():
            return {
                "scans": scans.subset(mask),
                "description": f"{int(mask.sum())} validation scans of {data_dir} (reports/split.json)",
            }
    return {
        "scans": scans,
        "description": f"all {len(scans.paths)} scans of {data_dir} (no split.json match)",
    }


def _evaluate(scorer: Scorer, scans: Any, card: ModelCard) -> dict[str, Any]:
    from training.evaluate import evaluate_scorer

    return evaluate_scorer(scorer, scans.pixels, scans.labels, card.preprocessing)
