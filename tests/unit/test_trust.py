"""brainscan.trust: the temperature, threshold and detector maths against hand-computed values."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from brainscan import CLASSES
from brainscan.trust import (
    DEFAULT_UNCERTAIN_BELOW,
    REASONS,
    InputChecks,
    ScopeDetector,
    Trust,
    TrustCard,
    apply_temperature,
    check_input,
    decide,
    expected_calibration_error,
    fit_temperature,
    input_measures,
    input_thumbnail,
    negative_log_likelihood,
    quantile_threshold,
    uncertain_threshold,
)
from tests.support.training import draw_scan


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ---- temperature -----------------------------------------------------------------------------
def test_temperature_sharpens_and_softens_as_computed_by_hand() -> None:
    p = np.array([[0.5, 0.25, 0.25, 0.0]])
    # T = 0.5 squares the probabilities: [0.25, 0.0625, 0.0625] / 0.375.
    np.testing.assert_allclose(apply_temperature(p, 0.5)[0, :3], [2 / 3, 1 / 6, 1 / 6], atol=1e-6)
    # T = 2 takes square roots: [0.7071, 0.5, 0.5] / 1.7071.
    np.testing.assert_allclose(apply_temperature(p[:, :3], 2.0)[0], [0.414214, 0.292893, 0.292893], atol=1e-5)
    np.testing.assert_array_equal(apply_temperature(p, 1.0), p.astype(np.float32))
    assert apply_temperature(p, 0.5)[0, 3] < 1e-12  # an exact zero stays (almost) zero


def test_fitted_temperature_matches_the_closed_form() -> None:
    # Every scan says 0.8 for its top class (log-odds ln 4) and 2 of 3 are right: the NLL-optimal
    # probability is 2/3 (log-odds ln 2), so T = ln 4 / ln 2 = 2.
    p = np.array([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2]])
    assert fit_temperature(p, [0, 0, 1]) == pytest.approx(2.0, rel=1e-5)
    # Right 5 times in 6 at 2/3: the optimum is 5/6 (log-odds ln 5), T = ln 2 / ln 5.
    p = np.array([[2 / 3, 1 / 3]] * 6)
    assert fit_temperature(p, [0, 0, 0, 0, 0, 1]) == pytest.approx(math.log(2) / math.log(5), rel=1e-5)


def test_negative_log_likelihood_by_hand() -> None:
    p = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert negative_log_likelihood(p, [0, 1]) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)


def test_expected_calibration_error_by_hand() -> None:
    # Two scans at 0.9 (one right): bin (13/15, 14/15], |0.5 - 0.9| * 2/3. One at 0.7, right:
    # bin (10/15, 11/15], |1 - 0.7| * 1/3. ECE = 0.26667 + 0.1.
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3]])
    assert expected_calibration_error(p, [0, 1, 0]) == pytest.approx(0.4 * 2 / 3 + 0.3 / 3)
    perfect = np.eye(2)[[0, 1, 1]]
    assert expected_calibration_error(perfect, [0, 1, 1]) == 0.0


# ---- thresholds ------------------------------------------------------------------------------
def test_uncertain_threshold_is_the_lowest_meeting_the_target() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7])
    correct = np.array([True, True, False, True, True])
    # Accuracy at or above each candidate: 1, 1, 2/3, 3/4, 4/5. The threshold lies midway to the next
    # lower confidence (half the gap above the lowest), so no fitted item sits on it.
    assert uncertain_threshold(confidence, correct, 0.75) == pytest.approx(0.65)
    assert uncertain_threshold(confidence, correct, 0.8) == pytest.approx(0.65)
    assert uncertain_threshold(confidence, correct, 0.9) == pytest.approx(0.925)
    assert uncertain_threshold(confidence, correct, 0.7) == pytest.approx(0.65)
    # Ties move together: both 0.9s are kept or flagged, never one of them.
    tied = uncertain_threshold(np.array([0.9, 0.9, 0.8]), np.array([True, False, True]), 1.0)
    assert 0.9 < tied < 0.9 + 1e-9


def test_quantile_threshold_leaves_the_allowed_share_above() -> None:
    scores = np.arange(1.0, 101.0)
    assert quantile_threshold(scores, 0.01) == 99.5  # only 100 lies above; midway to it
    assert quantile_threshold(scores, 0.015) == 99.5  # floor(1.5) = 1 may lie above
    assert quantile_threshold(scores, 0.0) == 100.5  # none above: half the last gap beyond the top
    assert quantile_threshold(np.array([3.0]), 0.0) == 3.0


# ---- detector --------------------------------------------------------------------------------
def test_mahalanobis_distance_by_hand() -> None:
    # Each class: its mean +-1 along each axis, so the shared covariance is diag(0.5, 0.5) and the
    # precision diag(2, 2); isotropic, so shrinkage leaves it unchanged.
    offsets = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    features = np.concatenate([offsets, offsets + np.array([4.0, 0.0])])
    labels = np.array([0] * 4 + [1] * 4)
    for shrinkage in (0.0, 0.1):
        detector = ScopeDetector.fit(features, labels, shrinkage=shrinkage, threshold=2.0)
        np.testing.assert_allclose(detector.precision, np.diag([2.0, 2.0]), atol=1e-12)
        distances = detector.distances(np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]]))
        np.testing.assert_allclose(distances, [math.sqrt(8), 0.0, math.sqrt(18)], atol=1e-9)
        np.testing.assert_allclose(detector.scores(np.array([[2.0, 0.0]])), [math.sqrt(8) / 2])


def test_shrinkage_pulls_an_anisotropic_covariance_towards_its_mean_variance() -> None:
    features = np.array([[2.0, 0], [-2, 0], [0, 1], [0, -1]])  # covariance diag(2, 0.5)
    detector = ScopeDetector.fit(features, np.zeros(4, int), shrinkage=0.5)
    # 0.5 * diag(2, 0.5) + 0.5 * 1.25 * I = diag(1.625, 0.875).
    np.testing.assert_allclose(detector.precision, np.diag([1 / 1.625, 1 / 0.875]), atol=1e-12)


def test_detector_round_trips_through_its_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    detector = ScopeDetector.fit(rng.normal(size=(40, 3)), np.arange(40) % 4, threshold=3.5)
    loaded = ScopeDetector.load(detector.save(tmp_path / "trust.npz"))
    probe = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(loaded.distances(probe), detector.distances(probe))
    assert loaded.threshold == 3.5


# ---- the decision ----------------------------------------------------------------------------
def test_decide_precedence_and_fields() -> None:
    p = np.array(
        [
            [0.97, 0.01, 0.01, 0.01],  # confident, in scope: no flag
            [0.60, 0.20, 0.10, 0.10],  # in scope, unsure: uncertain, label kept
            [0.97, 0.01, 0.01, 0.01],  # far from training: out of scope, label withheld
            [0.97, 0.01, 0.01, 0.01],  # failed an input check: out of scope whatever the score
        ]
    )
    verdicts = decide(p, 0.9, np.array([0.5, 0.9, 1.2, 0.1]), [None, None, None, "near_constant"])
    assert [v.flag for v in verdicts] == [None, "uncertain", "out_of_scope", "out_of_scope"]
    assert [v.label for v in verdicts] == [CLASSES[0], CLASSES[0], None, None]
    assert [v.flag_code for v in verdicts] == [None, "low_confidence", "far_from_training", "near_constant"]
    assert verdicts[3].flag_reason == REASONS["near_constant"]
    assert verdicts[2].scope_score == pytest.approx(1.2)
    assert verdicts[1].confidence == pytest.approx(0.6)
    assert verdicts[0].as_dict()["probabilities"]["glioma"] == pytest.approx(0.97)
    # A score of exactly 1 is still in scope; no detector means no score.
    assert decide(p[:1], 0.9, np.array([1.0]))[0].flag is None
    assert decide(p[:1], 0.9)[0].scope_score is None


def test_raw_trust_uses_raw_confidence_and_a_setting_overrides_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    raw = Trust.from_card(None, tmp_path)
    assert (raw.temperature, raw.uncertain_below, raw.detector, raw.calibrated) == (
        1.0,
        DEFAULT_UNCERTAIN_BELOW,
        None,
        False,
    )
    p = np.array([[0.85, 0.05, 0.05, 0.05]])
    (verdict,) = raw.judge(p, None, ["near_constant"])  # no input checks on an uncalibrated model
    assert (verdict.flag, verdict.label, verdict.scope_score) == ("uncertain", "glioma", None)
    assert Trust.from_card(None, tmp_path, uncertain_below=0.8).judge(p, None)[0].flag is None
    section = TrustCard(temperature=0.5, uncertain_below=0.95)
    calibrated = Trust.from_card(section, tmp_path)
    (verdict,) = calibrated.judge(p, None)
    # T = 0.5 squares: 0.7225 / (0.7225 + 3 * 0.0025) = 0.98969.
    assert verdict.confidence == pytest.approx(0.7225 / 0.73, rel=1e-5)
    assert verdict.flag is None
    with pytest.raises(FileNotFoundError):
        Trust.from_card(TrustCard(detector="mahalanobis", detector_file="trust.npz"), tmp_path)


# ---- input checks ----------------------------------------------------------------------------
def test_input_checks_refuse_blank_colour_and_text_but_not_a_head() -> None:
    checks = InputChecks()
    blank = Image.new("L", (200, 200), 0)
    assert check_input(input_thumbnail(png(blank)), checks) == "near_constant"
    colour = Image.new("RGB", (200, 200), (255, 0, 0))
    ImageDraw.Draw(colour).ellipse([40, 40, 160, 160], fill=(255, 255, 0))
    assert check_input(input_thumbnail(png(colour)), checks) == "strong_colour"
    page = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(page).text((10, 10), "patient report " * 3, fill=0)
    assert check_input(input_thumbnail(png(page)), checks) == "no_head"
    head = Image.fromarray(draw_scan(2, seed=5, size=128))
    assert check_input(input_thumbnail(png(head)), checks) is None
    # The same head in grey stored as RGB (as many scans are) passes too; a disabled check does not run.
    assert check_input(input_thumbnail(png(head.convert("RGB"))), checks) is None
    assert check_input(input_thumbnail(png(colour)), InputChecks(enabled=["near_constant"])) is None


def test_a_grey_file_is_checked_on_one_channel_with_the_same_measures_as_three() -> None:
    head = Image.fromarray(draw_scan(1, seed=3, size=160))
    grey, rgb = input_thumbnail(png(head)), input_thumbnail(png(head.convert("RGB")))
    assert grey.shape == (64, 64, 1) and rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb, grey.repeat(3, axis=-1))
    assert input_measures(grey) == input_measures(rgb)
    assert input_measures(grey)["colour_share"] == 0.0


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.mark.parametrize(
    ("mode", "side", "fmt", "reused"),
    [
        ("L", 512, "JPEG", True),  # the head path's 1/8 decode is exactly the thumbnail's decode
        ("L", 640, "JPEG", True),
        ("L", 256, "JPEG", False),  # the thumbnail decodes at 1/4 here, the head path at 1/8
        ("RGB", 512, "JPEG", False),  # the head path decodes to grey, the check needs the colour
        ("L", 512, "PNG", False),  # no reduced decode at all
    ],
)
def test_the_input_check_reuses_the_serving_decode_only_where_it_is_the_same_decode(
    monkeypatch: pytest.MonkeyPatch, mode: str, side: int, fmt: str, reused: bool
) -> None:
    from brainscan import trust
    from brainscan.imaging import InputSpec, prepare_and_view

    head = Image.fromarray(draw_scan(0, seed=4, size=128)).resize((side, side)).convert(mode)
    data = _jpeg(head) if fmt == "JPEG" else png(head)
    _, decoded = prepare_and_view(data, InputSpec(192, 192, 1, "head-zscore", "head"))
    assert decoded is not None
    own = input_thumbnail(data)
    if reused:
        # No second decode: the file is never opened again, and the thumbnail is the same array.
        monkeypatch.setattr(trust.Image, "open", lambda *_: pytest.fail("decoded the file again"))
    np.testing.assert_array_equal(input_thumbnail(data, decoded=decoded), own)
