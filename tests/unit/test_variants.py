"""The served-variant rule (brainscan.variants): int8 where the CPU has VNNI/AMX and the card shows it
within 0.3 points of fp32, fp32 elsewhere, BRAINSCAN_MODEL_FORMAT over both."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainscan.modelrepo import ModelCard
from brainscan.variants import choose_variant, int8_flag, parse_cpu_flags

VNNI = {"fpu", "avx2", "avx512f", "avx512_vnni"}
AVX2_ONLY = {"fpu", "avx2", "fma"}


def card_with_int8(folder: Path, int8: float | None = 0.9825, fp32: float | None = 0.9848) -> ModelCard:
    (folder / "model-int8.tflite").write_bytes(b"stand-in: the rule only checks that the file exists")
    entry: dict[str, object] = {"file": "model-int8.tflite"}
    if int8 is not None:
        entry["val_accuracy"] = int8
    if fp32 is not None:
        entry["savedmodel_val_accuracy"] = fp32
    return ModelCard(name="m", version="1", metrics={"val_accuracy": 0.99}, variants={"tflite-int8": entry})


def test_int8_serves_on_a_vnni_cpu_when_within_0_3_points(tmp_path: Path) -> None:
    choice = choose_variant(card_with_int8(tmp_path), tmp_path, flags=VNNI)
    assert choice.variant == "tflite-int8"
    # The fp32 figure is the one measured with int8 on the same split, not the card's training metric.
    assert (choice.int8_val_accuracy, choice.fp32_val_accuracy, choice.cpu_int8_flag) == (
        0.9825,
        0.9848,
        "avx512_vnni",
    )
    assert choice.reason == (
        "int8 98.25% vs fp32 98.48% on validation (within 0.3 points) and this CPU has avx512_vnni"
    )


def test_fp32_on_a_cpu_without_int8_instructions(tmp_path: Path) -> None:
    choice = choose_variant(card_with_int8(tmp_path), tmp_path, flags=AVX2_ONLY)
    assert choice.variant == "savedmodel"
    assert "no int8 dot-product instructions" in choice.reason


@pytest.mark.parametrize(
    ("int8", "fp32", "variant"),
    [(0.9800, 0.9830, "tflite-int8"), (0.9799, 0.9830, "savedmodel"), (0.9900, 0.9850, "tflite-int8")],
)
def test_the_0_3_point_boundary(tmp_path: Path, int8: float, fp32: float, variant: str) -> None:
    assert choose_variant(card_with_int8(tmp_path, int8, fp32), tmp_path, flags=VNNI).variant == variant


def test_too_much_loss_says_so(tmp_path: Path) -> None:
    choice = choose_variant(card_with_int8(tmp_path, 0.97, 0.985), tmp_path, flags=VNNI)
    assert (choice.variant, choice.reason) == (
        "savedmodel",
        "int8 97.00% vs fp32 98.50% on validation: more than 0.3 points lost",
    )


def test_unmeasured_int8_is_not_served(tmp_path: Path) -> None:
    choice = choose_variant(card_with_int8(tmp_path, int8=None), tmp_path, flags=VNNI)
    assert choice.variant == "savedmodel" and "does not record" in choice.reason


def test_fp32_accuracy_falls_back_to_the_card_metrics(tmp_path: Path) -> None:
    choice = choose_variant(card_with_int8(tmp_path, int8=0.988, fp32=None), tmp_path, flags=VNNI)
    assert (choice.variant, choice.fp32_val_accuracy) == ("tflite-int8", 0.99)


def test_missing_file_or_variant_means_fp32(tmp_path: Path) -> None:
    card = card_with_int8(tmp_path)
    (tmp_path / "model-int8.tflite").unlink()
    assert choose_variant(card, tmp_path, flags=VNNI).reason == (
        "the int8 variant's file is missing from the model folder"
    )
    plain = ModelCard(name="m", version="1")
    assert choose_variant(plain, tmp_path, flags=VNNI).variant == "savedmodel"


def test_the_setting_overrides_the_rule_both_ways(tmp_path: Path) -> None:
    card = card_with_int8(tmp_path)
    forced = choose_variant(card, tmp_path, model_format="savedmodel", flags=VNNI)
    assert (forced.variant, forced.reason) == ("savedmodel", "BRAINSCAN_MODEL_FORMAT")
    assert (
        choose_variant(card, tmp_path, model_format="tflite-int8", flags=AVX2_ONLY).variant == "tflite-int8"
    )


def test_cpu_flags_from_cpuinfo_text() -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_int8 avx512_vnni\n\nprocessor\t: 1\n"
    flags = parse_cpu_flags(cpuinfo)
    assert {"avx2", "amx_int8", "avx512_vnni"} <= flags
    assert int8_flag(flags) == "amx_int8"
    assert int8_flag({"avx_vnni"}) == "avx_vnni"
    assert int8_flag(AVX2_ONLY) is None
    assert parse_cpu_flags("no flags here") == set()
