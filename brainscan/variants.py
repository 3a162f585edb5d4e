"""Which variant of a model folder a process serves: the int8 TFLite file where it pays, fp32 elsewhere.

The rule, in order (``choose_variant``):

1. ``BRAINSCAN_MODEL_FORMAT``, when set, is obeyed ("savedmodel", "tflite", "tflite-int8").
2. The card's ``tflite-int8`` variant serves when all of these hold:

   * its file is in the model folder;
   * the card records its validation accuracy and the SavedModel's, measured on the same split in the
     same run (``variants["tflite-int8"]["val_accuracy"]`` and ``["savedmodel_val_accuracy"]``, written
     by ``brainscan export --int8 --data DIR``), and int8 is at most ``INT8_MAX_LOSS_POINTS`` (0.3)
     percentage points below fp32;
   * this CPU has int8 dot-product instructions (``/proc/cpuinfo`` flags ``amx_int8``, ``avx512_vnni``
     or ``avx_vnni``). Without them full-integer TFLite is no faster than the fp32 SavedModel (measured
     on an AVX2-only EPYC, docs/performance.md), so the accuracy it gives up would buy nothing.

3. Otherwise the card's own ``format`` (the SavedModel).

Every process applies the rule on its own CPU: a worker logs its choice at start-up, and the API's
``/v1/models`` and ``brainscan models list`` report the choice for the machine they run on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from brainscan.modelrepo import ModelCard

INT8_VARIANT = "tflite-int8"
INT8_FILE = "model-int8.tflite"
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # first found is reported
INT8_MAX_LOSS_POINTS = 0.3


@dataclass(frozen=True)
class VariantChoice:
    """The variant to serve, why, and the figures the rule read."""

    variant: str
    reason: str
    fp32_val_accuracy: float | None = None
    int8_val_accuracy: float | None = None
    cpu_int8_flag: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "served": self.variant,
            "reason": self.reason,
            "fp32_val_accuracy": self.fp32_val_accuracy,
            "int8_val_accuracy": self.int8_val_accuracy,
            "cpu_int8_flag": self.cpu_int8_flag,
        }


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU listed in ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where ``/proc/cpuinfo`` does not exist: not Linux)."""
    try:
        return frozenset(parse_cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace")))
    except OSError:
        return frozenset()


def int8_flag(flags: Sequence[str] | set[str] | frozenset[str]) -> str | None:
    """The int8 dot-product flag this CPU has (``INT8_CPU_FLAGS`` order), or None."""
    return next((flag for flag in INT8_CPU_FLAGS if flag in flags), None)


def _accuracy(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def choose_variant(
    card: ModelCard,
    folder: Path,
    model_format: str = "",
    flags: Sequence[str] | set[str] | frozenset[str] | None = None,
) -> VariantChoice:
    """The variant of the model in ``folder`` this machine serves (see the module's rule)."""
    entry = card.variants.get(INT8_VARIANT) or {}
    int8_accuracy = _accuracy(entry.get("val_accuracy"))
    fp32_accuracy = _accuracy(entry.get("savedmodel_val_accuracy"))
    if fp32_accuracy is None:
        fp32_accuracy = _accuracy(card.metrics.get("val_accuracy"))
    flag = int8_flag(cpu_flags() if flags is None else flags)
    figures = {"fp32_val_accuracy": fp32_accuracy, "int8_val_accuracy": int8_accuracy, "cpu_int8_flag": flag}

    if model_format:
        return VariantChoice(model_format, "BRAINSCAN_MODEL_FORMAT", **figures)
    default = card.format
    if not entry:
        return VariantChoice(default, "the card has no int8 variant", **figures)
    if not (folder / str(entry.get("file") or INT8_FILE)).is_file():
        return VariantChoice(default, "the int8 variant's file is missing from the model folder", **figures)
    if int8_accuracy is None or fp32_accuracy is None:
        return VariantChoice(
            default,
            "the card does not record the int8 and fp32 validation accuracies "
            "(brainscan export --int8 --data DIR measures them)",
            **figures,
        )
    loss = round(100.0 * (fp32_accuracy - int8_accuracy), 9)  # 0.983 - 0.980 is 0.30000000000000027
    compared = f"int8 {100 * int8_accuracy:.2f}% vs fp32 {100 * fp32_accuracy:.2f}% on validation"
    if loss > INT8_MAX_LOSS_POINTS:
        return VariantChoice(default, f"{compared}: more than {INT8_MAX_LOSS_POINTS} points lost", **figures)
    if flag is None:
        return VariantChoice(
            default,
            f"{compared}, but this CPU has no int8 dot-product instructions ({', '.join(INT8_CPU_FLAGS)})",
            **figures,
        )
    return VariantChoice(
        INT8_VARIANT, f"{compared} (within {INT8_MAX_LOSS_POINTS} points) and this CPU has {flag}", **figures
    )
