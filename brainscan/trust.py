"""What a served result may be trusted for: the scope detector, the temperature and the flag decision.

Everything here is NumPy on arrays a model already produced (plus a PIL thumbnail for the input
checks); ``brainscan.runtime`` loads it beside every served variant, ``training/calibrate.py`` fits it.

- **Input checks** (``check_input``): cheap tests on a small thumbnail of the decoded file that need
  no model: a nearly uniform image, an image in strong colour, no head-shaped foreground on a dark
  background. Each has a fixed reason code and text.
- **Scope detector** (``ScopeDetector``): class-conditional Mahalanobis distance with one shared,
  shrunk covariance, on the model's penultimate features (the ``features`` output of the export),
  fitted on the training split only. ``scope_score`` is that distance divided by the threshold
  chosen on the validation split, so ``scope_score > 1`` means out of scope for every model alike.
- **Temperature** (``apply_temperature``): ``softmax(log p / T)``, which needs only the served
  probabilities, so it works for every format, including the card-less original.
- **The flag** (``decide``): ``out_of_scope`` (an input check or ``scope_score > 1``: the label is
  withheld), else ``uncertain`` (calibrated confidence below ``uncertain_below``), else none.

The arrays live in ``trust.npz`` beside ``model.json``; the card's ``trust`` section (``TrustCard``)
describes them and carries the scalars.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, Field

from brainscan import CLASSES

if TYPE_CHECKING:
    from brainscan.imaging import ReducedDecode

TRUST_FILE = "trust.npz"
FEATURES_OUTPUT = "features"
Flag = Literal["uncertain", "out_of_scope"]
FLAGS: tuple[str, ...] = ("uncertain", "out_of_scope")
# A model without a fitted threshold (the card-less original, a model never calibrated) flags
# results whose raw top probability is below this: not a calibrated guarantee, a conservative default.
DEFAULT_UNCERTAIN_BELOW = 0.9
PROBABILITY_FLOOR = 1e-7  # log(0) guard: an int8 softmax can emit exact zeros

# Reason codes (stable, for metrics and clients) and their texts (for people). The texts quote
# nothing from inside a file.
REASONS: dict[str, str] = {
    "near_constant": "out of scope: the image is nearly uniform (blank), not a scan",
    "strong_colour": "out of scope: the image is in strong colour; MRI scans are greyscale",
    "no_head": "out of scope: no head-shaped foreground on a dark background",
    "far_from_training": "out of scope: unlike the scans this model was trained on",
    "low_confidence": "uncertain: the calibrated confidence is below the model's threshold",
}


# ---- input checks ----------------------------------------------------------------------------
THUMBNAIL_SIDE = 64
# Modes ``to_grey_or_rgb`` turns into one grey channel by itself (16-bit and float scans are stretched).
GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")


class InputChecks(BaseModel):
    """Thresholds of the cheap input checks, on a 64x64 thumbnail in 0-255 grey levels."""

    enabled: list[str] = Field(default_factory=lambda: ["near_constant", "strong_colour", "no_head"])
    min_spread: float = 12.0  # near_constant: 99th minus 1st percentile of grey below this
    chroma: float = 48.0  # strong_colour: a pixel whose max-min channel difference exceeds this ...
    max_colour_share: float = 0.05  # ... on more than this share of the image
    background_level: float = 0.2  # no_head: grey below 1st pct + this share of the spread is background
    min_dark_border: float = 0.2  # no_head: at least this share of the outer ring is background
    min_foreground: float = 0.05  # no_head: the foreground covers this much of the image ...
    max_foreground: float = 0.95  # ... and no more


def input_thumbnail(
    data: bytes, side: int = THUMBNAIL_SIDE, decoded: ReducedDecode | None = None
) -> np.ndarray:
    """File bytes (already accepted by ``brainscan.imaging.prepare``) -> uint8 ``(side, side, channels)``.

    JPEG decodes at a reduced scale (``draft``), so the check costs a fraction of the real decode. A
    greyscale file stays one channel (what three equal channels would measure, at a third of the work);
    anything else comes back RGB. ``decoded``, the serving path's 1/8 decode of the same bytes
    (``brainscan.imaging.prepare_and_view``), is used instead of decoding again when it is exactly the
    decode this would make (a greyscale JPEG whose draft scale here is the same): a JPEG's entropy
    decode costs most of a decode at any scale.
    """
    from brainscan.imaging import to_grey_or_rgb

    if decoded is not None and _same_decode(decoded, side):
        pixels = decoded.pixels
    else:
        image = Image.open(io.BytesIO(data))
        # JPEG: decode at the smallest DCT scale that is still at least side x side (1/8 of a 512 scan).
        image.draft(image.mode if image.mode in ("L", "RGB") else "RGB", (side, side))
        image = ImageOps.exif_transpose(image) or image
        pixels = to_grey_or_rgb(image, 1 if image.mode in GREY_MODES else 3)
    channels = pixels.shape[2]
    thumb = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    thumb = thumb.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(thumb, dtype=np.uint8).reshape(side, side, channels)


def _same_decode(decoded: ReducedDecode, side: int) -> bool:
    """Whether ``input_thumbnail``'s own decode of the file would be ``decoded``: a greyscale JPEG decoded
    to one channel (``draft("L")`` either way) at the scale PIL's ``draft`` picks for ``side``, the
    largest of 8, 4, 2, 1 that keeps both sides >= ``side``."""
    width, height = decoded.file_size
    fits = min(width // side, height // side)
    draft_scale = next((s for s in (8, 4, 2) if fits >= s), 1)
    return (
        decoded.file_mode == "L"
        and decoded.pixels.shape[2] == 1
        and decoded.scale > 1
        and decoded.scale == draft_scale
    )


def input_measures(thumbnail: np.ndarray, checks: InputChecks | None = None) -> dict[str, float]:
    """The numbers ``check_input`` compares with its thresholds (exposed so calibration can report them)."""
    checks = checks or InputChecks()
    rgb = np.asarray(thumbnail)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    planes = [rgb[..., c] for c in range(rgb.shape[-1])]
    # Channel by channel rather than reductions over the last axis: a tenth of the time on 64x64x3.
    grey = sum((p.astype(np.uint16) for p in planes), np.zeros(rgb.shape[:2], np.uint16)) // len(planes)
    cumulative = np.cumsum(np.bincount(grey.ravel(), minlength=256)) / grey.size
    low, high = float(np.searchsorted(cumulative, 0.01)), float(np.searchsorted(cumulative, 0.99))
    if len(planes) == 1:
        chroma = np.zeros(rgb.shape[:2], np.int16)  # one channel: no colour
    else:
        chroma = np.maximum.reduce(planes).astype(np.int16) - np.minimum.reduce(planes)
    # Relative, not absolute: many scans' surround is a dark grey, not black.
    background = grey <= low + checks.background_level * (high - low)
    ring = max(1, grey.shape[0] // 16)
    inner = background[ring:-ring, ring:-ring]
    border_pixels = background.size - inner.size
    return {
        "spread": high - low,
        "colour_share": float(np.count_nonzero(chroma > checks.chroma)) / chroma.size,
        "dark_border": float(np.count_nonzero(background) - np.count_nonzero(inner)) / border_pixels,
        "foreground": 1.0 - float(np.count_nonzero(background)) / background.size,
    }


def check_input(thumbnail: np.ndarray, checks: InputChecks | None = None) -> str | None:
    """The reason code of the first failed input check, or None when the image may be a scan."""
    checks = checks or InputChecks()
    m = input_measures(thumbnail, checks)
    if "near_constant" in checks.enabled and m["spread"] < checks.min_spread:
        return "near_constant"
    if "strong_colour" in checks.enabled and m["colour_share"] > checks.max_colour_share:
        return "strong_colour"
    if "no_head" in checks.enabled and (
        m["dark_border"] < checks.min_dark_border
        or not checks.min_foreground <= m["foreground"] <= checks.max_foreground
    ):
        return "no_head"
    return None


# ---- temperature -----------------------------------------------------------------------------
def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row: T > 1 softens, T < 1 sharpens, T = 1 changes nothing."""
    p = np.asarray(probabilities, dtype=np.float64)
    if temperature == 1.0:
        return p.astype(np.float32)
    logits = np.log(np.clip(p, PROBABILITY_FLOOR, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def negative_log_likelihood(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Mean ``-log p[label]`` (probabilities floored at 1e-7)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 0.0
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], PROBABILITY_FLOOR, 1.0)).mean())


def fit_temperature(
    probabilities: np.ndarray, labels: Sequence[int], low: float = 0.05, high: float = 20.0
) -> float:
    """The temperature minimising validation NLL (golden-section search on log T; NLL is unimodal in it)."""
    log_p = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, 1.0))
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = log_p / math.exp(log_t)
        z_max = z.max(axis=1, keepdims=True)
        log_norm = (z_max + np.log(np.exp(z - z_max).sum(axis=1, keepdims=True)))[:, 0]
        return float((log_norm - z[rows, labels]).mean())

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):  # the bracket shrinks by 0.618 per step: far below float precision
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


def expected_calibration_error(probabilities: np.ndarray, labels: Sequence[int], bins: int = 15) -> float:
    """Top-label ECE: equal-width confidence bins on (0, 1], |accuracy - mean confidence| weighted by size."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 0.0
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    # Bin k holds confidences in (k/bins, (k+1)/bins]; ceil puts an exact edge in the lower bin.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for k in range(bins):
        in_bin = index == k
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def reliability_bins(
    probabilities: np.ndarray, labels: Sequence[int], bins: int = 15
) -> list[dict[str, float]]:
    """Per non-empty bin: lower/upper edge, count, mean confidence, accuracy (for the diagram)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        in_bin = index == k
        if in_bin.any():
            out.append(
                {
                    "low": k / bins,
                    "high": (k + 1) / bins,
                    "count": int(in_bin.sum()),
                    "confidence": float(confidence[in_bin].mean()),
                    "accuracy": float(correct[in_bin].mean()),
                }
            )
    return out


# ---- thresholds ------------------------------------------------------------------------------
def uncertain_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float = 0.995) -> float:
    """The lowest confidence threshold at which the items at or above it are >= ``target_accuracy`` correct.

    Lowest, so that as many items as possible stay unflagged. Candidates are the observed confidences;
    the threshold returned lies midway between the chosen one and the next lower observed confidence
    (half the last gap below it when it is the lowest), so that it flags the same fitted items while
    none sits exactly on it, where the rounding of another format (TFLite, int8) would flip it. When
    no candidate reaches the target, returns a hair above the highest confidence: everything is flagged.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if len(confidence) == 0:
        return DEFAULT_UNCERTAIN_BELOW
    order = np.argsort(-confidence, kind="stable")
    sorted_conf, sorted_correct = confidence[order], correct[order]
    running = np.cumsum(sorted_correct) / np.arange(1, len(order) + 1)
    # A threshold equal to sorted_conf[i] keeps every item with that confidence: evaluate only at the
    # last index of each run of equal confidences.
    last_of_run = np.append(sorted_conf[1:] != sorted_conf[:-1], True)
    ok = np.flatnonzero(last_of_run & (running >= target_accuracy))
    if ok.size == 0:
        return float(np.nextafter(sorted_conf[0], np.inf))
    chosen = sorted_conf[ok[-1]]
    lower = sorted_conf[sorted_conf < chosen]
    if lower.size:
        return float((chosen + lower[0]) / 2)
    higher = sorted_conf[sorted_conf > chosen]
    return float(chosen - (higher[-1] - chosen) / 2) if higher.size else float(chosen)


def quantile_threshold(scores: np.ndarray, share_above: float) -> float:
    """A threshold leaving at most ``share_above`` of ``scores`` strictly above it.

    Midway between the highest score kept and the next one up (or, when none may lie above, half
    the last gap above the highest), so that no fitted scan sits exactly on the boundary where the
    rounding of another format (TFLite, int8) would flip it.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    if len(scores) == 0:
        raise ValueError("no scores to choose a threshold from")
    allowed = math.floor(share_above * len(scores))  # how many may lie above
    kept = len(scores) - 1 - allowed
    if kept + 1 < len(scores):
        return float((scores[kept] + scores[kept + 1]) / 2)
    gap = scores[kept] - scores[kept - 1] if kept > 0 else 0.0
    return float(scores[kept] + gap / 2)


# ---- scope detector --------------------------------------------------------------------------
@dataclass(frozen=True)
class ScopeDetector:
    """Class-conditional Mahalanobis distance with a shared covariance (Lee et al., 2018).

    ``means``: ``[classes, d]`` per-class feature means; ``precision``: ``[d, d]`` inverse of the
    shrunk shared covariance; ``threshold``: the distance at which an input is out of scope.
    """

    means: np.ndarray
    precision: np.ndarray
    threshold: float

    @classmethod
    def fit(
        cls, features: np.ndarray, labels: Sequence[int], shrinkage: float = 0.1, threshold: float = 1.0
    ) -> ScopeDetector:
        """Means and shared covariance of ``features`` by class; covariance shrunk towards its mean variance:
        ``(1 - s) * cov + s * trace(cov) / d * I``, which keeps it invertible when d nears n."""
        x = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        classes = int(labels.max()) + 1 if len(labels) else 0
        if len(x) <= x.shape[1] // 4 or any(not (labels == k).any() for k in range(classes)):
            raise ValueError("too few training features per class to fit a scope detector")
        means = np.stack([x[labels == k].mean(axis=0) for k in range(classes)])
        centred = x - means[labels]
        covariance = centred.T @ centred / len(x)
        d = covariance.shape[0]
        shrunk = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / d * np.eye(d)
        precision = np.linalg.inv(shrunk)
        return cls(means.astype(np.float64), ((precision + precision.T) / 2).astype(np.float64), threshold)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance to the nearest class mean, ``[n]``."""
        x = np.asarray(features, dtype=np.float64)
        if len(x) == 0:
            return np.zeros(0)
        # (x - m)^T P (x - m) = x^T P x - 2 x^T P m + m^T P m, for all classes at once.
        xp = x @ self.precision
        squared = (
            (xp * x).sum(axis=1)[:, None]
            - 2 * xp @ self.means.T
            + ((self.means @ self.precision) * self.means).sum(axis=1)[None, :]
        )
        return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``scope_score``: distance / threshold; above 1 is out of scope."""
        return self.distances(features) / self.threshold

    def with_threshold(self, threshold: float) -> ScopeDetector:
        return ScopeDetector(self.means, self.precision, float(threshold))

    def save(self, path: Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, means=self.means, precision=self.precision, threshold=np.float64(self.threshold))
        tmp.replace(path)  # a worker never loads half a file
        return path

    @classmethod
    def load(cls, path: Path) -> ScopeDetector:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(data["means"], data["precision"], float(data["threshold"]))


# ---- the card section ------------------------------------------------------------------------
class TrustCard(BaseModel):
    """``model.json``'s ``trust`` section, written by ``brainscan calibrate`` (training/calibrate.py)."""

    temperature: float = 1.0  # served probabilities = softmax(log p / temperature)
    uncertain_below: float = DEFAULT_UNCERTAIN_BELOW  # calibrated confidence under this: "uncertain"
    target_accuracy: float = 0.995  # what uncertain_below was chosen for, on the validation split
    detector: str | None = None  # "mahalanobis" when a detector is fitted, else None
    detector_file: str | None = None  # TRUST_FILE: means, precision, threshold
    features_output: str | None = None  # the served signature's features output (FEATURES_OUTPUT)
    feature_layer: str | None = None  # which Keras layer the features are ("pool", "dense", ...)
    feature_dim: int | None = None
    shrinkage: float | None = None
    scope_threshold: float | None = None  # the Mahalanobis distance at scope_score = 1
    max_out_of_scope: float | None = None  # validation share the threshold was chosen to allow
    input_checks: InputChecks | None = None  # None: no input checks
    fitted_on: dict[str, Any] = Field(default_factory=dict)  # data, counts, fingerprint
    validation: dict[str, Any] = Field(default_factory=dict)  # what the fit measured (ECE, NLL, shares)
    fitted_at: str | None = None


# ---- the decision ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """One scored scan as served: calibrated probabilities (CLASSES order) and what to trust of them."""

    probabilities: np.ndarray  # calibrated, float32 [4], CLASSES order
    label: str | None  # None when out_of_scope
    confidence: float  # calibrated top probability
    flag: str | None  # None | "uncertain" | "out_of_scope"
    flag_code: str | None  # a key of REASONS
    flag_reason: str | None  # REASONS[flag_code], for people
    scope_score: float | None  # distance / threshold (> 1 = out of scope); None without a detector

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": self.confidence,
            "probabilities": {c: float(p) for c, p in zip(CLASSES, self.probabilities, strict=True)},
            "flag": self.flag,
            "flag_reason": self.flag_reason,
            "scope_score": self.scope_score,
        }


def decide(
    probabilities: np.ndarray,
    uncertain_below: float,
    scope_scores: np.ndarray | None = None,
    input_findings: Sequence[str | None] | None = None,
) -> list[Verdict]:
    """Flags for a batch of calibrated probabilities ``[n, 4]``.

    Order of precedence: a failed input check, then ``scope_score > 1`` (both ``out_of_scope``,
    label withheld), then confidence below ``uncertain_below`` (``uncertain``, label kept).
    """
    p = np.asarray(probabilities, dtype=np.float32)
    n = len(p)
    findings = list(input_findings) if input_findings is not None else [None] * n
    if len(findings) != n or (scope_scores is not None and len(scope_scores) != n):
        raise ValueError("probabilities, scope scores and input findings must have one row per scan")
    verdicts = []
    for i in range(n):
        best = int(np.argmax(p[i]))
        confidence = float(p[i, best])
        score = None if scope_scores is None else float(scope_scores[i])
        code: str | None
        if findings[i] is not None:
            flag, code = "out_of_scope", findings[i]
        elif score is not None and score > 1.0:
            flag, code = "out_of_scope", "far_from_training"
        elif confidence < uncertain_below:
            flag, code = "uncertain", "low_confidence"
        else:
            flag, code = None, None
        verdicts.append(
            Verdict(
                probabilities=p[i],
                label=None if flag == "out_of_scope" else CLASSES[best],
                confidence=confidence,
                flag=flag,
                flag_code=code,
                flag_reason=REASONS[code] if code else None,
                scope_score=score,
            )
        )
    return verdicts


@dataclass(frozen=True)
class Trust:
    """What a served model applies after its forward pass; ``Trust.raw()`` for a model without a section."""

    temperature: float = 1.0
    uncertain_below: float = DEFAULT_UNCERTAIN_BELOW
    detector: ScopeDetector | None = None
    input_checks: InputChecks | None = None
    calibrated: bool = False  # True when the thresholds come from a fitted card section

    @classmethod
    def raw(cls, uncertain_below: float | None = None) -> Trust:
        return cls(uncertain_below=DEFAULT_UNCERTAIN_BELOW if uncertain_below is None else uncertain_below)

    @classmethod
    def from_card(
        cls, section: TrustCard | None, folder: Path, uncertain_below: float | None = None
    ) -> Trust:
        """The model folder's fitted section; ``uncertain_below`` (a setting) overrides the card's."""
        if section is None:
            return cls.raw(uncertain_below)
        detector = None
        if section.detector:
            if not section.detector_file:
                raise ValueError("the card's trust section names a detector but no detector_file")
            path = Path(folder) / section.detector_file
            if not path.is_file():
                raise FileNotFoundError(f"the card's scope detector file {path} is missing")
            detector = ScopeDetector.load(path)
        return cls(
            temperature=section.temperature,
            uncertain_below=section.uncertain_below if uncertain_below is None else uncertain_below,
            detector=detector,
            input_checks=section.input_checks,
            calibrated=True,
        )

    def judge(
        self,
        probabilities: np.ndarray,
        features: np.ndarray | None,
        input_findings: Sequence[str | None] | None = None,
    ) -> list[Verdict]:
        """Raw model probabilities (+ features) -> one ``Verdict`` per row."""
        calibrated = apply_temperature(probabilities, self.temperature)
        scores = None
        if self.detector is not None:
            if features is None:
                raise ValueError("this model has a scope detector but its output carries no features")
            scores = self.detector.scores(features)
        findings = input_findings if self.input_checks is not None else None
        return decide(calibrated, self.uncertain_below, scores, findings)

    def check(self, data: bytes, decoded: ReducedDecode | None = None) -> str | None:
        """The input-check finding for one file's bytes (None when this model has no input checks);
        ``decoded``: the serving path's reduced decode of them, if it made one (``input_thumbnail``)."""
        if self.input_checks is None:
            return None
        return check_input(input_thumbnail(data, decoded=decoded), self.input_checks)
