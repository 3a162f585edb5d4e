"""Training recipes: every hyper-parameter named once, and the Keras objects built from them.

Plain Keras 3 (backend-agnostic). ``RESNET50_RECIPE`` is the original project's two-stage fine-tune;
``COMPACT_RECIPE`` is brainscan's default model, trained from scratch on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import keras

from training.architectures import Augmentation, CompactShape, build_augmenter


@dataclass(frozen=True)
class Stage:
    epochs: int
    learning_rate: float


@dataclass(frozen=True)
class Recipe:
    arch: str  # "compact" | "resnet50"
    input_size: int
    channels: int
    crop: str  # "head" | "brain" | "none" (brainscan.imaging.Crop)
    # "none" (the graph scales) | "resnet50" (caffe-style) | "head-zscore" (per-scan standardisation)
    preprocessing: str
    batch_size: int
    stages: tuple[Stage, ...]
    augmentation: Augmentation
    optimizer: str = "adam"  # "adam" | "adamw"
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    cosine_decay: bool = False
    label_smoothing: float = 0.0
    # Mixup (Zhang et al. 2018): each training batch blended with itself reversed, pixels and one-hot
    # labels alike, by a Beta(alpha, alpha) weight per scan; 0 leaves it out.
    mixup_alpha: float = 0.0
    ema_momentum: float | None = None  # evaluate and export an exponential moving average of weights
    early_stopping_patience: int | None = None
    validation_fraction: float = 0.15
    split_seed: int = 1337
    # Initial weights, augmentation draws and batch order. Separate from the split so that seeded runs
    # of one recipe (an ensemble's members, or a check of run-to-run spread) share one validation set.
    seed: int = 1337
    compact_shape: CompactShape = field(default_factory=CompactShape)
    # "mixed_bfloat16" trains in bfloat16 where the hardware makes it faster (AMX, or a GPU),
    # float32 elsewhere; variables and the exported model stay float32 either way.
    precision: str = "float32"

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


RESNET50_RECIPE = Recipe(
    arch="resnet50",
    input_size=224,
    channels=3,
    crop="none",
    preprocessing="resnet50",
    batch_size=32,
    # Stage 1: backbone frozen; stage 2: last 40 layers unfrozen, BatchNormalization kept frozen.
    stages=(Stage(epochs=5, learning_rate=1e-4), Stage(epochs=15, learning_rate=1e-5)),
    augmentation=Augmentation(
        rotation_degrees=20, shift=0.2, shear=0.2, zoom=0.2, horizontal_flip=True, contrast=0, brightness=0
    ),
    optimizer="adam",
)

COMPACT_RECIPE = Recipe(
    arch="compact",
    input_size=192,
    channels=1,
    # Version 3: head found on a 1/8-scale decode (DCT-domain JPEG), per-scan standardisation
    # inside the head mask; brightness and contrast no longer reach the network.
    crop="head",
    preprocessing="head-zscore",
    batch_size=32,
    # 40 epochs of ~108 s (192 px, bf16) fit the 80-minute budget on the 2-core AMD EPYC; ~80 s in
    # float32 on a 2-core Intel Xeon without AMX (README, "Runs that did not become the default").
    stages=(Stage(epochs=40, learning_rate=2e-3),),
    augmentation=Augmentation(
        rotation_degrees=15.0,
        shift=0.1,
        zoom=0.15,
        horizontal_flip=True,
        # Wider than any shift the service must tolerate (contrast 0.7-1.5, brightness 0.7-1.3).
        contrast_range=(0.6, 1.6),
        brightness_range=(0.6, 1.4),
        gamma_range=(0.7, 1.4),
        window_jitter=0.1,
    ),
    precision="mixed_bfloat16",
    optimizer="adamw",
    weight_decay=0.05,
    warmup_epochs=2,
    cosine_decay=True,
    label_smoothing=0.1,
    ema_momentum=0.998,
    early_stopping_patience=None,  # a cosine schedule is meant to run to its end
)

RECIPES = {"compact": COMPACT_RECIPE, "resnet50": RESNET50_RECIPE}


def with_overrides(
    recipe: Recipe,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    input_size: int | None = None,
    mixup_alpha: float | None = None,
) -> Recipe:
    """The recipe with its total epochs scaled (stages keep their proportions), batch size, seed,
    input size or mixup changed."""
    if epochs is not None:
        scale = epochs / recipe.epochs
        stages = [Stage(max(1, round(s.epochs * scale)), s.learning_rate) for s in recipe.stages]
        recipe = replace(recipe, stages=tuple(stages))
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    if seed is not None:
        recipe = replace(recipe, seed=seed)
    if input_size is not None:
        recipe = replace(recipe, input_size=input_size)
    if mixup_alpha is not None:
        recipe = replace(recipe, mixup_alpha=mixup_alpha)
    return recipe


def recipe_from_record(record: dict) -> Recipe:
    """The ``Recipe`` a card's ``training.recipe`` records: JSON's lists back to the tuples it held;
    a field added to ``Recipe`` after the card was written takes its default."""

    def tuples(fields: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}

    fields = dict(record)
    fields["stages"] = tuple(Stage(**stage) for stage in fields["stages"])
    fields["augmentation"] = Augmentation(**tuples(fields["augmentation"]))
    fields["compact_shape"] = CompactShape(**tuples(fields["compact_shape"]))
    return Recipe(**fields)


def bf16_support() -> str:
    """How this machine computes bfloat16: "native" where it is faster than float32 (a GPU, or a CPU
    with AMX), "partial" on a CPU with AVX-512 BF16 but no AMX (faster on some, slower on others),
    "none" where it would be emulated (always slower)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return "native"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "none"
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
    if "amx_bf16" in flags:
        return "native"
    return "partial" if "avx512_bf16" in flags else "none"


def learning_rate_schedule(recipe: Recipe, stage: Stage, steps_per_epoch: int):  # type: ignore[no-untyped-def]
    if not recipe.cosine_decay:
        return stage.learning_rate
    total_steps = stage.epochs * steps_per_epoch
    # A short run (a smoke test) still warms up, over at most a quarter of its steps.
    warmup_steps = min(int(recipe.warmup_epochs * steps_per_epoch), total_steps // 4)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=stage.learning_rate * 0.01 if warmup_steps else stage.learning_rate,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=stage.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
        alpha=0.01,
    )


def make_optimizer(recipe: Recipe, stage: Stage, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate = learning_rate_schedule(recipe, stage, steps_per_epoch)
    ema = {"use_ema": True, "ema_momentum": recipe.ema_momentum} if recipe.ema_momentum else {}
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=recipe.weight_decay, **ema)
    return keras.optimizers.Adam(learning_rate=rate, **ema)


def make_loss(recipe: Recipe) -> keras.losses.Loss:
    # Labels are one-hot so that label smoothing applies; the loss is what evaluate reports too.
    return keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)


def training_model(model: keras.Model, recipe: Recipe, seed: int = 1337) -> keras.Model:
    """``model`` behind the augmentation layers, which act only while training."""
    inputs = keras.Input(model.input_shape[1:], name="train_pixels")
    augmented = build_augmenter(recipe.augmentation, seed)(inputs)
    return keras.Model(inputs, model(augmented), name=f"{model.name}_training")
