"""Load a model from the repository and score batches with it: one loader for workers, evaluate, bench.

``load_scorer`` returns a ``Scorer``: ``.card`` (the model card) and ``.predict(batch)`` mapping
float32 model input ``[n, h, w, c]`` (what ``brainscan.imaging.prepare`` returns, stacked) to float32
probabilities ``[n, 4]`` in ``brainscan.CLASSES`` order, whatever order the model's card lists.
``.predict_with_features(batch)`` also returns the penultimate features (the export's second output,
``features``; None for an export without it) from the same forward pass, and ``.judge(batch,
findings)`` turns both into one ``brainscan.trust.Verdict`` per scan (calibrated probabilities, label,
flag, flag_reason, scope_score) with the model's ``.trust`` (from the card's ``trust`` section and
``trust.npz``; raw probabilities and a default confidence threshold when the card has none).

Two variants of one model folder:

- ``savedmodel``: ``tf.saved_model.load`` and the ``serve`` (else ``serving_default``) signature. Its one
  input is discovered by name, since exports differ (the original project's is ``keras_tensor``, the
  compact model's ``pixels``); the output is ``output_0`` or the only one; ``features``, when present,
  is the second output.
- ``tflite`` / ``tflite-int8``: a file written by ``brainscan export`` beside the SavedModel, run with
  the TFLite interpreter. A full-integer model's int8 input and output are (de)quantized here with the
  tensor's own scale and zero point, so callers never see the difference. Outputs are found by the
  names of the file's ``serve`` signature (``output_0``, ``features``).

Which variant serves: the ``model_format`` argument, else ``BRAINSCAN_MODEL_FORMAT``, else the rule in
:mod:`brainscan.variants` (the int8 file where the CPU has VNNI/AMX and the card shows it within 0.3
points of fp32, else the card's ``format``); the scorer's ``variant_reason`` says why. Nothing here
imports Celery or FastAPI.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from brainscan import CLASSES
from brainscan.modelrepo import ModelCard, ModelNotFound, ModelRef, read_card, resolve_model
from brainscan.trust import FEATURES_OUTPUT, Trust, Verdict
from brainscan.variants import choose_variant

VARIANTS = ("savedmodel", "tflite", "tflite-int8")
DEFAULT_VARIANT_FILES = {"tflite": "model.tflite", "tflite-int8": "model-int8.tflite"}


class Scorer(Protocol):
    card: ModelCard
    variant: str
    variant_reason: str  # why this variant serves (brainscan.variants)
    path: Path
    trust: Trust

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[n, h, w, c]`` model input -> float32 raw probabilities ``[n, 4]`` in CLASSES order."""
        ...

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw probabilities ``[n, 4]``, features ``[n, d]`` or None) from one forward pass."""
        ...

    def judge(self, batch: np.ndarray, input_findings: Sequence[str | None] | None = None) -> list[Verdict]:
        """One verdict per scan: calibrated probabilities, label, flag, flag_reason, scope_score."""
        ...


class _Judging:
    """``predict`` and ``judge`` on top of a variant's ``predict_with_features``."""

    trust: Trust

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_with_features(batch)[0]

    def judge(self, batch: np.ndarray, input_findings: Sequence[str | None] | None = None) -> list[Verdict]:
        probabilities, features = self.predict_with_features(batch)
        return self.trust.judge(probabilities, features, input_findings)


def class_order(card: ModelCard) -> np.ndarray:
    """Column permutation from the card's class order to ``CLASSES``."""
    if sorted(card.classes) != sorted(CLASSES):
        raise ModelNotFound(
            f"model {card.name}/{card.version} classes {card.classes} are not {list(CLASSES)}"
        )
    return np.asarray([card.classes.index(name) for name in CLASSES])


def _check_batch(batch: np.ndarray, card: ModelCard) -> np.ndarray:
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    spec = card.input_spec
    expected = (spec.height, spec.width, spec.channels)
    if batch.ndim != 4 or batch.shape[1:] != expected:
        raise ValueError(
            f"model {card.name}/{card.version} takes [n, {', '.join(map(str, expected))}] "
            f"input, got shape {list(batch.shape)}"
        )
    return batch


@dataclass
class SavedModelScorer(_Judging):
    card: ModelCard
    path: Path
    module: Any = field(repr=False)
    function: Any = field(repr=False)
    input_name: str
    output_name: str
    order: np.ndarray = field(repr=False)
    variant: str = "savedmodel"
    features_name: str | None = None
    trust: Trust = field(default_factory=Trust.raw)
    variant_reason: str = ""

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import tensorflow as tf

        batch = _check_batch(batch, self.card)
        if len(batch) == 0:
            width = (
                self.function.structured_outputs[self.features_name].shape[-1] if self.features_name else 0
            )
            empty = np.zeros((0, width), np.float32) if self.features_name else None
            return np.zeros((0, len(CLASSES)), np.float32), empty
        outputs = self.function(**{self.input_name: tf.convert_to_tensor(batch)})
        probabilities = np.asarray(outputs[self.output_name], dtype=np.float32)[:, self.order]
        features = np.asarray(outputs[self.features_name], np.float32) if self.features_name else None
        return probabilities, features


def serving_signature(module: Any) -> tuple[Any, str, str]:
    """(concrete function, input name, output name) of a loaded SavedModel's serving signature."""
    signatures = getattr(module, "signatures", {})
    for key in ("serve", "serving_default"):
        if key in signatures:
            function = signatures[key]
            break
    else:
        raise ModelNotFound(
            f"SavedModel has no 'serve' or 'serving_default' signature (has {list(signatures)})"
        )
    _, kwargs = function.structured_input_signature
    if len(kwargs) != 1:
        raise ModelNotFound(f"the serving signature must take one input, it takes {sorted(kwargs)}")
    input_name = next(iter(kwargs))
    outputs = function.structured_outputs
    if "output_0" in outputs:
        output_name = "output_0"
    elif len(outputs) == 1:
        output_name = next(iter(outputs))
    else:
        raise ModelNotFound(
            f"the serving signature has several outputs and none is output_0: {sorted(outputs)}"
        )
    return function, input_name, output_name


def features_output(function: Any) -> str | None:
    """The serving signature's features output name, or None (exports before issue 11, the original)."""
    return FEATURES_OUTPUT if FEATURES_OUTPUT in function.structured_outputs else None


def load_savedmodel(path: Path, card: ModelCard) -> SavedModelScorer:
    import tensorflow as tf

    module = tf.saved_model.load(str(path))
    function, input_name, output_name = serving_signature(module)
    # The module keeps the variables alive; the signature alone would not.
    return SavedModelScorer(
        card,
        Path(path),
        module,
        function,
        input_name,
        output_name,
        class_order(card),
        features_name=features_output(function),
    )


def tflite_interpreter_class() -> Any:
    """``ai_edge_litert``'s Interpreter when installed (TF's successor for TFLite), else ``tf.lite``'s.

    TensorFlow 2.21 still ships ``tf.lite.Interpreter`` (deprecated in favour of LiteRT, same API).
    """
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter


def _quantize(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    if not scale:  # float input (a float TFLite model, or a quantized one with float I/O)
        return values.astype(dtype)
    info = np.iinfo(dtype)
    # The same arithmetic as np.clip(np.round(values / scale + zero_point), ...), in one buffer: a
    # batch of 32 scans is 1.2 M values, and four temporaries of it were a twentieth of an int8 worker.
    scaled = np.divide(values, np.float32(scale), dtype=np.float32)
    scaled += np.float32(zero_point)
    np.rint(scaled, out=scaled)
    np.clip(scaled, info.min, info.max, out=scaled)
    return scaled.astype(dtype)


def _dequantize(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if not scale:
        return values.astype(np.float32)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


@dataclass
class TFLiteScorer(_Judging):
    card: ModelCard
    path: Path
    interpreter: Any = field(repr=False)
    order: np.ndarray = field(repr=False)
    variant: str = "tflite"
    # Tensor indices of the outputs, from the file's signature (output order in a converted file is
    # not the signature's order).
    probabilities_index: int = -1
    features_index: int | None = None
    trust: Trust = field(default_factory=Trust.raw)
    variant_reason: str = ""
    _batch: int = field(default=-1, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def quantized(self) -> bool:
        return bool(self.interpreter.get_input_details()[0]["quantization"][0])

    def _output_detail(self, index: int) -> dict[str, Any]:
        return next(d for d in self.interpreter.get_output_details() if d["index"] == index)

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = _check_batch(batch, self.card)
        if len(batch) == 0:
            empty = np.zeros((0, 0), np.float32) if self.features_index is not None else None
            return np.zeros((0, len(CLASSES)), np.float32), empty
        # One interpreter is not re-entrant; a worker calls from one thread, evaluate too.
        with self._lock:
            interpreter = self.interpreter
            input_detail = interpreter.get_input_details()[0]
            if self._batch != len(batch):
                # The converted graph has a dynamic batch dimension; size it to this batch.
                interpreter.resize_tensor_input(input_detail["index"], list(batch.shape), strict=False)
                interpreter.allocate_tensors()
                self._batch = len(batch)
                input_detail = interpreter.get_input_details()[0]
            output_detail = self._output_detail(self.probabilities_index)
            interpreter.set_tensor(input_detail["index"], _quantize(batch, input_detail))
            interpreter.invoke()
            raw = interpreter.get_tensor(output_detail["index"])
            probabilities = _dequantize(raw, output_detail)
            features = None
            if self.features_index is not None:
                feature_detail = self._output_detail(self.features_index)
                features = _dequantize(interpreter.get_tensor(self.features_index), feature_detail)
        if output_detail["quantization"][0]:
            # An int8 softmax is exact to 1/256 only: renormalise so rows are distributions again.
            probabilities = np.clip(probabilities, 0.0, None)
            total = probabilities.sum(axis=1, keepdims=True)
            probabilities = np.divide(
                probabilities, total, out=np.full_like(probabilities, 0.25), where=total > 0
            )
        return probabilities[:, self.order].astype(np.float32), features


def load_tflite(
    path: Path, card: ModelCard, num_threads: int | None = None, variant: str = "tflite"
) -> TFLiteScorer:
    if not Path(path).is_file():
        raise ModelNotFound(f"no TFLite file {path}")
    threads = num_threads if num_threads and num_threads > 0 else (os.cpu_count() or 1)
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that it moves to ai_edge_litert; it works, and is what TF 2.21 has.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tflite_interpreter_class()(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) not in (1, 2):
        raise ModelNotFound(
            f"{path}: a TFLite model with one input and one output (plus features) expected, "
            f"got {len(inputs)} and {len(outputs)}"
        )
    probabilities_index, features_index = _tflite_outputs(interpreter, outputs, path)
    shape = tuple(int(d) for d in inputs[0]["shape"][1:])
    spec = card.input_spec
    if shape != (spec.height, spec.width, spec.channels):
        raise ModelNotFound(
            f"{path}: input shape {shape} does not match the card's "
            f"{(spec.height, spec.width, spec.channels)}"
        )
    card = card.model_copy(update={"format": "tflite", "tflite_file": Path(path).name})
    return TFLiteScorer(
        card,
        Path(path),
        interpreter,
        class_order(card),
        variant=variant,
        probabilities_index=probabilities_index,
        features_index=features_index,
    )


def _tflite_outputs(interpreter: Any, outputs: list[dict[str, Any]], path: Path) -> tuple[int, int | None]:
    """(probabilities tensor index, features tensor index or None), by the ``serve`` signature's names."""
    if len(outputs) == 1:
        return int(outputs[0]["index"]), None
    signatures = interpreter.get_signature_list()
    key = "serve" if "serve" in signatures else next(iter(signatures), None)
    if key is None:
        raise ModelNotFound(f"{path}: two outputs but no signature naming them")
    named = interpreter.get_signature_runner(key).get_output_details()
    if "output_0" not in named or FEATURES_OUTPUT not in named:
        raise ModelNotFound(f"{path}: outputs {sorted(named)}, expected output_0 and {FEATURES_OUTPUT}")
    return int(named["output_0"]["index"]), int(named[FEATURES_OUTPUT]["index"])


def variant_file(ref: ModelRef, variant: str) -> Path:
    """Where a TFLite variant of ``ref`` lives, per its card (or the default file name)."""
    card = ref.card
    name = (card.variants.get(variant) or {}).get("file")
    if not name and variant == "tflite" and card.tflite_file:
        name = card.tflite_file
    path = ref.path / (name or DEFAULT_VARIANT_FILES[variant])
    if not path.is_file():
        flag = "--int8 --representative DIR" if variant == "tflite-int8" else "--tflite"
        raise ModelNotFound(
            f"model {card.name}/{card.version} has no {variant} variant ({path} is missing): "
            f"run `brainscan export --model {ref.path} {flag}`"
        )
    return path


def load_scorer(
    ref_or_path: ModelRef | Path | str,
    model_format: str | None = None,
    num_threads: int | None = None,
) -> Scorer:
    """The model at ``ref_or_path`` (a ModelRef, a model folder, a repository folder, or a .tflite file).

    ``model_format`` picks the variant ("savedmodel", "tflite", "tflite-int8"); None reads
    ``BRAINSCAN_MODEL_FORMAT``, and an empty value means the serving rule (``brainscan.variants``).
    ``num_threads`` sizes the TFLite interpreter (None reads ``BRAINSCAN_TF_THREADS``; 0 means all
    cores). The scorer's ``trust`` comes from the card (``BRAINSCAN_UNCERTAIN_BELOW`` overrides its
    threshold).
    """
    scorer = _load_variant(ref_or_path, model_format, num_threads)
    scorer.trust = load_trust(scorer)
    return scorer


def load_trust(scorer: Scorer) -> Trust:
    """The card's trust section for this variant; refuses a detector whose features it cannot serve."""
    from brainscan.settings import get_settings

    card = scorer.card
    folder = scorer.path if scorer.path.is_dir() else scorer.path.parent
    try:
        trust = Trust.from_card(card.trust, folder, get_settings().uncertain_below)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"model {card.name}/{card.version}: {exc}") from None
    if trust.detector is not None:
        probe = np.zeros(
            (1, card.input_spec.height, card.input_spec.width, card.input_spec.channels), np.float32
        )
        _, features = scorer.predict_with_features(probe)
        if features is None or features.shape[1] != trust.detector.means.shape[1]:
            raise ModelNotFound(
                f"model {card.name}/{card.version} ({scorer.variant}) has a scope detector but its "
                f"{scorer.path.name} does not output {trust.detector.means.shape[1]} features: "
                f"run `brainscan calibrate --model {folder} --data TRAINING` to re-export it"
            )
    return trust


def _load_variant(
    ref_or_path: ModelRef | Path | str, model_format: str | None, num_threads: int | None
) -> Scorer:
    from brainscan.settings import get_settings

    if num_threads is None:
        num_threads = get_settings().tf_threads
    if isinstance(ref_or_path, (str, Path)) and Path(ref_or_path).suffix == ".tflite":
        path = Path(ref_or_path)
        if not path.is_file():
            raise ModelNotFound(f"no TFLite file {path}")
        card = read_card(path.parent)
        variant = "tflite-int8" if "int8" in path.stem else "tflite"
        scorer = load_tflite(path, card, num_threads, variant)
        scorer.variant_reason = "a .tflite file was named"
        return scorer

    ref = ref_or_path if isinstance(ref_or_path, ModelRef) else resolve_model(Path(ref_or_path))
    if model_format is None:
        model_format = get_settings().model_format
    choice = choose_variant(ref.card, ref.path, model_format)
    variant = choice.variant
    if variant not in VARIANTS:
        raise ModelNotFound(f"unknown model format {variant!r}: one of {', '.join(VARIANTS)}")
    scorer: SavedModelScorer | TFLiteScorer
    if variant == "savedmodel":
        if not (ref.path / "saved_model.pb").is_file():
            raise ModelNotFound(f"{ref.path} holds no saved_model.pb")
        scorer = load_savedmodel(ref.path, ref.card)
    else:
        scorer = load_tflite(variant_file(ref, variant), ref.card, num_threads, variant)
    scorer.variant_reason = choice.reason
    return scorer


def predict_in_batches(scorer: Scorer, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities for any number of float32 inputs, ``batch_size`` at a time."""
    outputs = [
        scorer.predict(inputs[start : start + batch_size]) for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, len(CLASSES)), np.float32)
