"""The inference engine: one model per worker process, warmed up, scored in batches.

Loading is ``brainscan.runtime.load_scorer`` and nothing else (the loader evaluate and the benchmarks
use too), so a worker serves the SavedModel or its TFLite variants (``BRAINSCAN_MODEL_FORMAT`` =
``tflite`` | ``tflite-int8``) through the same code path, with the same class order and checks.
Preprocessing is ``brainscan.imaging.prepare`` and nothing else, so serving sees the same tensor as
training. Decoding runs on a small thread pool (PIL releases the GIL) so that the next batch is
decoded while the model scores the current one (as many decode threads as model threads:
``decode_threads``). The model is re-resolved at batch boundaries when
``models/promoted.json`` changes, so ``brainscan models promote`` takes effect without a restart.

Trust. ``score_batch`` returns one ``brainscan.trust.Verdict`` per scan, computed by the scorer's
``judge`` from the same forward pass as the probabilities: calibrated probabilities (the card's
temperature), ``label`` (None when out of scope), ``confidence``, ``flag`` (None | "uncertain" |
"out_of_scope"), ``flag_code``, ``flag_reason`` and ``scope_score`` (None without a detector). The
model's cheap input checks run at decode time, on the decode threads, and travel in
``Prepared.finding``.

Threads. ``BRAINSCAN_TF_THREADS`` (``settings.tf_threads``) sizes TensorFlow's intra-op pool *and*
the TFLite interpreter; with N worker processes on one machine set it to ``cores / N`` so they do
not oversubscribe the cores (0 = every core, right for one worker per machine).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainscan import CLASSES
from brainscan.imaging import ReducedDecode, ScanError, prepare, prepare_and_view
from brainscan.modelrepo import PROMOTED_FILE, ModelCard, ModelNotFound, ModelRef, resolve_model
from brainscan.runtime import Scorer, load_scorer
from brainscan.settings import Settings, get_settings
from brainscan.storage import StorageUnavailable
from brainscan.trust import Verdict

log = logging.getLogger(__name__)

_threads_configured = False


def configure_tensorflow(threads: int) -> None:
    """Size TF's thread pools once, before the first op (TF refuses afterwards).

    ``threads`` is ``settings.tf_threads``: with N worker processes on one machine, ``cores / N``
    keeps them from oversubscribing the cores; 0 leaves TensorFlow's default (all cores). The TFLite
    interpreter gets the same number in ``Engine.load``.
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
            # Inference graphs are chains of ops: one or two inter-op threads are all they use.
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError as exc:  # TF already initialised in this process
            log.warning("could not set TensorFlow threads: %s", exc)


def decode_threads(tf_threads: int) -> int:
    """Decode threads beside a model with ``tf_threads`` threads (0: all cores).

    The decode of the next batch overlaps the model's call on the current one; as many decode
    threads as model threads keep a worker within its share of the cores (``tf_threads`` is set to
    ``cores / workers``), where a fixed pool would put every worker's decodes on every core. A
    worker that owns the machine gets up to four: past that a batch decodes faster than any model
    here scores it.
    """
    return tf_threads if tf_threads > 0 else max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Prepared:
    """One scan, ready for the model (``pixels``) or failed with a per-item reason (``error``).

    ``finding`` is the reason code of a failed input check (``brainscan.trust.REASONS``): the scan is
    still scored, and comes out ``out_of_scope``.
    """

    pixels: np.ndarray | None
    error: str | None
    ms: float
    finding: str | None = None
    unreadable: bool = False  # storage could not be read (StorageUnavailable): not the scan's fault


@dataclass(frozen=True)
class PendingDecode:
    """A batch being decoded on the pool: ``result()`` waits for it, ``cancel()`` drops what has not
    started (a flush that yields to urgent work does not leave the pool busy with scans it gave back)."""

    futures: list[Future[Prepared]]

    def result(self) -> list[Prepared]:
        return [future.result() for future in self.futures]

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


@dataclass(frozen=True)
class Served:
    """The model a worker serves: where it came from (``ref``) and what scores with it."""

    ref: ModelRef
    scorer: Scorer

    @property
    def card(self) -> ModelCard:
        return self.scorer.card


class Engine:
    """Holds the served model; ``score_batch`` is called from one thread (the task's)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.model: Served | None = None
        self.decoders = ThreadPoolExecutor(
            max_workers=decode_threads(self.settings.tf_threads), thread_name_prefix="decode"
        )
        self._promoted_mtime: float | None = None

    # ---- model lifecycle -------------------------------------------------------------------
    def load(self) -> Served:
        configure_tensorflow(self.settings.tf_threads)
        self._promoted_mtime = self._promoted_stamp()
        ref = resolve_model(self.settings.model_dir, self.settings.model_name, self.settings.model_version)
        self.model = self._load_and_warm(ref)
        return self.model

    def _load_and_warm(self, ref: ModelRef) -> Served:
        started = time.perf_counter()
        scorer = load_scorer(
            ref, model_format=self.settings.model_format, num_threads=self.settings.tf_threads
        )
        spec = scorer.card.input_spec
        # The first call traces and allocates (a TFLite interpreter sizes its tensors for the batch);
        # doing it now keeps it out of the first job's latency.
        dummy = np.zeros(
            (min(2, self.settings.batch_size), spec.height, spec.width, spec.channels), np.float32
        )
        probabilities = scorer.predict(dummy)
        if probabilities.shape != (dummy.shape[0], len(CLASSES)):
            raise ModelNotFound(f"model output has shape {probabilities.shape}, expected (n, {len(CLASSES)})")
        trust = scorer.trust
        log.info(
            "trust: %s, temperature %.3f, uncertain below %.3f%s",
            "scope detector" if trust.detector is not None else "no scope detector",
            trust.temperature,
            trust.uncertain_below,
            "" if trust.calibrated else " (raw confidence: the model was never calibrated)",
        )
        log.info(
            "serving %s/%s (%s) from %s (%s, input %s, %s threads) ready in %.1fs; variant because: %s",
            ref.card.name,
            ref.card.version,
            scorer.variant,
            scorer.path,
            "card-less original contract" if ref.card.card_less else "model card",
            (spec.height, spec.width, spec.channels),
            self.settings.tf_threads or "all",
            time.perf_counter() - started,
            scorer.variant_reason or "the card's format",
        )
        return Served(ref, scorer)

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

    def prepare_many(self, sources: list[Callable[[], bytes]]) -> PendingDecode:
        """Read and decode a batch on the pool; ``result()`` gives one ``Prepared`` per source, in order.

        Returns at once, so the caller can score the previous batch while this one decodes.
        """
        return PendingDecode([self.decoders.submit(self._prepare_one, source) for source in sources])

    def _prepare_one(self, source: Callable[[], bytes]) -> Prepared:
        started = time.perf_counter()
        finding = None
        try:
            data = source()
            # The input check reuses the head path's 1/8 decode where it is the one it would make.
            prepared, decoded = prepare_and_view(data, self.card.input_spec, self.settings.max_image_pixels)
            pixels: np.ndarray | None = prepared
            error = None
            finding = self._input_finding(data, decoded)
        except StorageUnavailable as exc:
            return Prepared(None, str(exc), (time.perf_counter() - started) * 1000.0, unreadable=True)
        except FileNotFoundError:
            pixels, error = None, "scan bytes missing from storage"
        except ScanError as exc:
            pixels, error = None, str(exc)
        except Exception as exc:  # a decoder bug must fail one item, not the worker
            log.exception("unexpected error preparing a scan")
            pixels, error = None, f"cannot decode image: {type(exc).__name__}"
        return Prepared(pixels, error, (time.perf_counter() - started) * 1000.0, finding)

    def _input_finding(self, data: bytes, decoded: ReducedDecode | None) -> str | None:
        """The served model's input checks on bytes ``prepare`` accepted (None: passed, or no checks)."""
        if self.model is None:
            self.load()
        assert self.model is not None
        try:
            return self.model.scorer.trust.check(data, decoded)
        except Exception:  # the file decoded once already; a check must never fail the scan
            log.exception("input check failed to run; scoring the scan without it")
            return None

    def score_batch(self, images: np.ndarray, findings: Sequence[str | None] | None = None) -> list[Verdict]:
        """float32 [n, h, w, c] (+ each scan's input-check finding) -> one ``Verdict`` per scan."""
        if self.model is None:
            self.load()
        assert self.model is not None
        return self.model.scorer.judge(images, findings)


_ENGINE: Engine | None = None


def get_engine() -> Engine:
    """The process's engine (loaded on first use; the worker loads it at start-up)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine()
        _ENGINE.load()
    return _ENGINE
