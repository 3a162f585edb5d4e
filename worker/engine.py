"""The inference engine: one SavedModel per worker process, warmed up, scored in batches.

Preprocessing is ``brainscan.imaging.prepare`` and nothing else, so serving sees the same tensor as
training. Decoding runs on a small thread pool (PIL releases the GIL) so that the next batch is
decoded while the model scores the current one. The model is re-resolved at batch boundaries when
``models/promoted.json`` changes, so ``brainscan models promote`` takes effect without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainscan import CLASSES
from brainscan.imaging import ScanError, prepare
from brainscan.modelrepo import PROMOTED_FILE, ModelCard, ModelNotFound, ModelRef, resolve_model
from brainscan.settings import Settings, get_settings

log = logging.getLogger(__name__)

_threads_configured = False


def configure_tensorflow(threads: int) -> None:
    """Size TF's thread pools once, before the first op (TF refuses afterwards).

    With N worker processes on one machine, ``tf_threads = cores / N`` keeps them from
    oversubscribing the cores; 0 leaves TensorFlow's default (all cores).
    """
    global _threads_configured
    if _threads_configured:
        return
    _threads_configured = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError as exc:  # TF already initialised in this process
            log.warning("could not set TensorFlow threads: %s", exc)


@dataclass(frozen=True)
class Prepared:
    """One scan, ready for the model (``pixels``) or failed with a per-item reason (``error``)."""

    pixels: np.ndarray | None
    error: str | None
    ms: float


@dataclass
class LoadedModel:
    ref: ModelRef
    function: object  # the concrete serving function
    input_name: str
    output_name: str
    order: np.ndarray  # column permutation from the card's class order to CLASSES

    @property
    def card(self) -> ModelCard:
        return self.ref.card


def _serving_function(module: object) -> tuple[object, str, str]:
    signatures = getattr(module, "signatures", {})
    for key in ("serve", "serving_default"):
        if key in signatures:
            function = signatures[key]
            break
    else:
        raise ModelNotFound(f"SavedModel has no 'serve' or 'serving_default' signature ({list(signatures)})")
    _, kwargs = function.structured_input_signature
    if len(kwargs) != 1:
        raise ModelNotFound(f"serving signature must take one input, it takes {sorted(kwargs)}")
    input_name = next(iter(kwargs))
    outputs = function.structured_outputs
    if "output_0" in outputs:
        output_name = "output_0"
    elif len(outputs) == 1:
        output_name = next(iter(outputs))
    else:
        raise ModelNotFound(f"serving signature has several outputs and none is output_0: {sorted(outputs)}")
    return function, input_name, output_name


def _class_order(card: ModelCard) -> np.ndarray:
    if sorted(card.classes) != sorted(CLASSES):
        raise ModelNotFound(
            f"model {card.name}/{card.version} classes {card.classes} are not {list(CLASSES)}"
        )
    return np.asarray([card.classes.index(name) for name in CLASSES])


def load_model(ref: ModelRef) -> LoadedModel:
    import tensorflow as tf

    if ref.card.format != "savedmodel":
        raise ModelNotFound(
            f"model format {ref.card.format!r} is not served by this worker (savedmodel only)"
        )
    module = tf.saved_model.load(str(ref.path))
    function, input_name, output_name = _serving_function(module)
    loaded = LoadedModel(ref, function, input_name, output_name, _class_order(ref.card))
    loaded.module = module  # type: ignore[attr-defined]  # keep the variables alive
    return loaded


class Engine:
    """Holds the served model; ``score_batch`` is called from one thread (the task's)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.model: LoadedModel | None = None
        self.decoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self._promoted_mtime: float | None = None
        self._lock = threading.Lock()

    # ---- model lifecycle -------------------------------------------------------------------
    def load(self) -> LoadedModel:
        configure_tensorflow(self.settings.tf_threads)
        self._promoted_mtime = self._promoted_stamp()
        ref = resolve_model(self.settings.model_dir, self.settings.model_name, self.settings.model_version)
        self.model = self._load_and_warm(ref)
        return self.model

    def _load_and_warm(self, ref: ModelRef) -> LoadedModel:
        started = time.perf_counter()
        loaded = load_model(ref)
        spec = loaded.card.input_spec
        # The first call traces and allocates; doing it now keeps it out of the first job's latency.
        dummy = np.zeros(
            (min(2, self.settings.batch_size), spec.height, spec.width, spec.channels), np.float32
        )
        probabilities = self._run(loaded, dummy)
        if probabilities.shape != (dummy.shape[0], len(CLASSES)):
            raise ModelNotFound(f"model output has shape {probabilities.shape}, expected (n, {len(CLASSES)})")
        log.info(
            "serving %s/%s from %s (%s, input %s) ready in %.1fs",
            ref.card.name,
            ref.card.version,
            ref.path,
            "card-less original contract" if ref.card.card_less else "model card",
            (spec.height, spec.width, spec.channels),
            time.perf_counter() - started,
        )
        return loaded

    def _promoted_stamp(self) -> float | None:
        try:
            return (Path(self.settings.model_dir) / PROMOTED_FILE).stat().st_mtime
        except OSError:
            return None

    def maybe_reload(self) -> bool:
        """At a batch boundary: switch models if a different one was promoted. Cheap (one stat)."""
        if self.settings.model_name:  # pinned by configuration: promotion does not apply
            return False
        stamp = self._promoted_stamp()
        if stamp == self._promoted_mtime:
            return False
        self._promoted_mtime = stamp
        try:
            ref = resolve_model(self.settings.model_dir, "", self.settings.model_version)
        except ModelNotFound as exc:
            log.error("promotion changed but no model resolves, keeping the current one: %s", exc)
            return False
        if self.model is not None and ref.path.resolve() == self.model.ref.path.resolve():
            return False
        try:
            self.model = self._load_and_warm(ref)
        except Exception:
            log.exception("could not load promoted model %s, keeping the current one", ref.path)
            return False
        return True

    @property
    def card(self) -> ModelCard:
        if self.model is None:
            self.load()
        assert self.model is not None
        return self.model.card

    # ---- scoring ---------------------------------------------------------------------------
    def prepare(self, data: bytes) -> np.ndarray:
        """Bytes -> model input; raises ScanError with the per-item reason."""
        return prepare(data, self.card.input_spec, self.settings.max_image_pixels)

    def prepare_many(self, sources: list[Callable[[], bytes]]) -> Future[list[Prepared]]:
        """Read and decode a batch on the pool; resolves to one ``Prepared`` per source, in order.

        Returns at once, so the caller can score the previous batch while this one decodes.
        """

        def work() -> list[Prepared]:
            return list(self.decoders.map(self._prepare_one, sources))

        return _runner().submit(work)

    def _prepare_one(self, source: Callable[[], bytes]) -> Prepared:
        started = time.perf_counter()
        try:
            pixels: np.ndarray | None = self.prepare(source())
            error = None
        except FileNotFoundError:
            pixels, error = None, "scan bytes missing from storage"
        except ScanError as exc:
            pixels, error = None, str(exc)
        except Exception as exc:  # a decoder bug must fail one item, not the worker
            log.exception("unexpected error preparing a scan")
            pixels, error = None, f"cannot decode image: {type(exc).__name__}"
        return Prepared(pixels, error, (time.perf_counter() - started) * 1000.0)

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, h, w, c] -> probabilities [n, 4] in ``CLASSES`` order."""
        if self.model is None:
            self.load()
        assert self.model is not None
        return self._run(self.model, images)

    @staticmethod
    def _run(model: LoadedModel, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        tensor = tf.convert_to_tensor(np.ascontiguousarray(images, dtype=np.float32))
        outputs = model.function(**{model.input_name: tensor})  # type: ignore[operator]
        probabilities = np.asarray(outputs[model.output_name], dtype=np.float32)
        return probabilities[:, model.order]


_RUNNER: ThreadPoolExecutor | None = None


def _runner() -> ThreadPoolExecutor:
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-batch")
    return _RUNNER


_ENGINE: Engine | None = None


def get_engine() -> Engine:
    """The process's engine (loaded on first use; the worker loads it at start-up)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine()
        _ENGINE.load()
    return _ENGINE
