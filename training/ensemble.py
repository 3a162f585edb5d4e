"""Several trained members of one recipe served as one model: their probabilities averaged.

The members differ only in their seed (initial weights, augmentation draws, batch order), so their
errors are partly independent and the average makes fewer. The ensemble is an ordinary Keras model of
built-in layers, so it exports, quantises, calibrates and explains like a single network:

    pixels -> member_1 ... member_n (each member's layers up to its last feature map)
           -> maps (the members' maps side by side: what Grad-CAM explains)
           -> pool (global average: the members' pooled features side by side: what the scope
                    detector reads)
           -> member_logits (one Dense whose kernel is block-diagonal: member k's classifier reads
                             only member k's features)
           -> softmax per member -> probabilities (their mean)

Dropout, the identity when serving, is left out.

``build_ensemble`` (``brainscan ensemble --member A --member B --out DIR --data DATA``) checks that the
members read the same input from the same data and were validated on the same scans, evaluates the
ensemble on that split, exports it (a SavedModel with Grad-CAM's split signatures and no Keras file,
so that two members still fit the repository's size budget) and calibrates it as ``brainscan train``
ends. Members are ordinary ``brainscan train --seed N`` runs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from brainscan import CLASSES
from brainscan.modelrepo import ModelCard, read_card
from training.data import load_scanset, validation_paths
from training.recipe import RECIPES


def member_parts(model: Any) -> tuple[Any, Any]:
    """(``model``'s layers up to its last feature map as a model, its classifier Dense layer)."""
    import keras

    pool = model.get_layer("pool")
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense) or head.units != len(CLASSES):
        raise ValueError(f"model {model.name}: its last layer is not a {len(CLASSES)}-class Dense")
    return keras.Model(model.inputs, pool.input, name=model.name), head


def combine(members: Sequence[Any]) -> Any:
    """One Keras model whose output is the mean of ``members``' probabilities (same input)."""
    import keras
    from keras import layers

    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    shapes = {tuple(m.input_shape[1:]) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"the members take different inputs: {sorted(shapes)}")
    classes = len(CLASSES)
    inputs = keras.Input(shapes.pop(), name="pixels")
    trunks, heads = zip(*(member_parts(m) for m in members), strict=True)
    maps = []
    for index, trunk in enumerate(trunks, start=1):
        trunk.name = f"member_{index}"
        maps.append(trunk(inputs))
    x = layers.Concatenate(name="maps")(maps)
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    logits = layers.Dense(classes * len(members), name="member_logits")(features)
    x = layers.Reshape((len(members), classes), name="per_member")(logits)
    x = layers.Softmax(axis=-1, name="member_probabilities")(x)
    outputs = layers.GlobalAveragePooling1D(name="probabilities", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="brainscan_ensemble")

    widths = [head.kernel.shape[0] for head in heads]
    kernel = np.zeros((sum(widths), classes * len(members)), np.float32)
    bias = np.zeros(classes * len(members), np.float32)
    row = 0
    for index, (head, width) in enumerate(zip(heads, widths, strict=True)):
        head_kernel, head_bias = (np.asarray(w) for w in head.get_weights())
        kernel[row : row + width, index * classes : (index + 1) * classes] = head_kernel
        bias[index * classes : (index + 1) * classes] = head_bias
        row += width
    model.get_layer("member_logits").set_weights([kernel, bias])
    return model


def build_ensemble(
    members: Sequence[Path],
    out_dir: Path,
    data_dir: Path,
    cache_dir: Path | None,
    name: str | None = None,
    version: str | None = None,
) -> ModelCard:
    """Combine trained member folders into one served model folder at ``out_dir``, evaluated on the
    members' shared validation split, exported and calibrated (as ``brainscan train`` ends)."""
    import keras

    from training.calibrate import calibrate_model
    from training.evaluate import classification_metrics
    from training.export import export_savedmodel, gradcam_map
    from training.reports import write_evaluation
    from training.train import machine_name, predict_pixels

    started = time.monotonic()
    members = [Path(m) for m in members]
    cards = [read_card(m) for m in members]
    splits = [validation_paths(m) for m in members]
    _check_members(members, cards, splits)
    first = cards[0]
    scans = load_scanset(Path(data_dir), first.input_spec, cache_dir)
    if scans.fingerprint != first.data_fingerprint:
        raise ValueError(f"{data_dir} is not the data the members were trained on (fingerprint differs)")
    val_set = scans.subset(np.array([path in splits[0] for path in scans.paths]))

    model = combine([keras.saving.load_model(str(m / "model.keras"), compile=False) for m in members])
    # The members' own preprocessing (a card may predate the recipe's current one).
    recipe = replace(RECIPES[first.architecture], preprocessing=first.preprocessing)
    probabilities = predict_pixels(model, val_set.pixels, recipe)
    metrics = classification_metrics(probabilities, val_set.labels)
    out_dir = Path(out_dir)
    reports = out_dir / "reports"
    title = f"ensemble of {len(members)} {first.architecture} members on the leak-free validation split"
    write_evaluation(metrics, reports, "validation", title)
    shutil.copyfile(members[0] / "reports" / "split.json", reports / "split.json")
    export_savedmodel(model, out_dir)  # no model.keras: Grad-CAM reads the SavedModel's split signatures
    explained = gradcam_map(model)
    member_training = [
        {
            "folder": str(member),
            "seed": card.training.get("recipe", {}).get("seed"),
            "val_accuracy": card.metrics.get("val_accuracy"),
            "wall_seconds": card.training.get("wall_seconds"),
            "machine": card.training.get("machine"),
            "precision": card.training.get("precision"),
        }
        for member, card in zip(members, cards, strict=True)
    ]
    members_seconds = sum(float(card.training.get("wall_seconds") or 0.0) for card in cards)
    card = ModelCard(
        name=name or out_dir.parent.name,
        version=version or out_dir.name,
        classes=list(CLASSES),
        input_size=first.input_size,
        channels=first.channels,
        preprocessing=first.preprocessing,
        crop=first.crop,
        architecture=f"{first.architecture}-ensemble",
        metrics={"val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"], "val_n": metrics["n"]},
        data_fingerprint=first.data_fingerprint,
        gradcam_layer=explained[0] if explained else None,
        training={
            "data_dir": str(data_dir),
            "members": member_training,
            "recipe": first.training.get("recipe"),
            "train_counts": first.training.get("train_counts"),
            "validation_counts": first.training.get("validation_counts"),
            "parameters": int(model.count_params()),
            # Training from scratch = every member's run plus combining them.
            "wall_seconds": round(members_seconds + time.monotonic() - started, 1),
            "machine": machine_name(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    card.write(out_dir)
    return calibrate_model(out_dir, Path(data_dir), cache_dir)


def _check_members(members: Sequence[Path], cards: Sequence[ModelCard], splits: Sequence[set[str]]) -> None:
    """Members must read the same input the same way, come from the same data and share one split."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two member folders")
    first = cards[0]
    for member, card, split in zip(members, cards, splits, strict=True):
        if not (member / "model.keras").is_file():
            raise ValueError(f"{member} has no model.keras: train members with `brainscan train`")
        if card.architecture not in RECIPES:
            raise ValueError(f"{member}: architecture {card.architecture!r} cannot be a member")
        same = (card.input_spec, card.classes, card.data_fingerprint) == (
            first.input_spec,
            first.classes,
            first.data_fingerprint,
        )
        if not same:
            raise ValueError(f"{member} differs from {members[0]} in input, classes or training data")
        if split != splits[0]:
            raise ValueError(f"{member} was validated on other scans than {members[0]}")
