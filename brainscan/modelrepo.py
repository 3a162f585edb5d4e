"""The model repository contract: ``models/<name>/<version>/`` = SavedModel + ``model.json`` card.

The server never guesses: a card says the classes, input size, channels, crop and preprocessing.
The one exception is the original project's export, which has no card; it is served with the
contract it was built under (224x224 RGB, ``resnet50.preprocess_input``, the four classes in order).
Which version serves is decided by ``models/promoted.json`` (``brainscan models promote``), else the
only/newest model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from brainscan import CLASSES
from brainscan.imaging import Crop, InputSpec, Preprocessing
from brainscan.trust import TrustCard

CARD_FILE = "model.json"
PROMOTED_FILE = "promoted.json"


# What an API client is told when no model resolves: never a folder, a file or a command to run.
NO_MODEL = "no model to serve"
UNREADABLE_REPOSITORY = "no model to serve: the model repository cannot be read"


class ModelNotFound(RuntimeError):
    """No model to serve. ``str(exc)`` is for operators (it names folders and what to run);
    ``public_message`` is what an API client may be told: model names and versions at most."""

    def __init__(self, message: str, public_message: str = NO_MODEL) -> None:
        super().__init__(message)
        self.public_message = public_message

    def __reduce__(self) -> tuple[type[ModelNotFound], tuple[str, str]]:
        # Pickled (a multiprocessing or Celery boundary): keep the public message too.
        return type(self), (str(self), self.public_message)


def public_reason(exc: BaseException) -> str:
    """The client-safe reason why no model resolved: a :class:`ModelNotFound`'s ``public_message``,
    else (a card or ``promoted.json`` that cannot be read or parsed: ``OSError``, ``ValueError``,
    whose texts quote paths or file contents) a fixed text."""
    return exc.public_message if isinstance(exc, ModelNotFound) else UNREADABLE_REPOSITORY


class ModelCard(BaseModel):
    name: str
    version: str
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    input_size: tuple[int, int] = (224, 224)
    channels: int = 3
    preprocessing: Preprocessing = "resnet50"
    crop: Crop = "none"
    architecture: str = "resnet50"
    format: str = "savedmodel"  # savedmodel | tflite
    tflite_file: str | None = None  # a TFLite variant beside the SavedModel, if exported
    # Other files that serve the same model, by variant ("tflite", "tflite-int8"): {"file": ..., and
    # what `brainscan export` measured, e.g. max_abs_diff against the SavedModel, val_accuracy}.
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_fingerprint: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    gradcam_layer: str | None = None  # feature map Grad-CAM explains; None = the last spatial one
    card_less: bool = False  # True when we inferred the original project's contract
    # Scope detector, temperature and flag thresholds (brainscan/trust.py; `brainscan calibrate`).
    # None: served with raw probabilities and flags from raw confidence only.
    trust: TrustCard | None = None

    @property
    def input_spec(self) -> InputSpec:
        height, width = self.input_size
        return InputSpec(height, width, self.channels, self.preprocessing, self.crop)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(self.model_dump_json(indent=2, exclude={"card_less"}) + "\n")
        return path


@dataclass(frozen=True)
class ModelRef:
    path: Path
    card: ModelCard


def is_model_folder(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / CARD_FILE).is_file()


def read_card(folder: Path, name: str | None = None, version: str | None = None) -> ModelCard:
    card_path = folder / CARD_FILE
    if card_path.is_file():
        return ModelCard.model_validate_json(card_path.read_text())
    if (folder / "saved_model.pb").is_file():
        return ModelCard(
            name=name or folder.parent.name or "model",
            version=version or folder.name,
            card_less=True,
        )
    raise ModelNotFound(f"{folder} holds neither a SavedModel nor a {CARD_FILE}")


def _version_key(version: str) -> tuple:
    # Numeric parts sort numerically so that "10" comes after "9".
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._-]", version))


def list_models(model_dir: Path) -> list[ModelRef]:
    refs: list[ModelRef] = []
    if not model_dir.is_dir():
        return refs
    for name_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        versions = sorted((p for p in name_dir.iterdir() if p.is_dir()), key=lambda p: _version_key(p.name))
        for version_dir in versions:
            if is_model_folder(version_dir):
                refs.append(ModelRef(version_dir, read_card(version_dir, name_dir.name, version_dir.name)))
    return refs


def promoted(model_dir: Path) -> tuple[str, str] | None:
    path = model_dir / PROMOTED_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return str(data["name"]), str(data["version"])


def promote(model_dir: Path, name: str, version: str) -> ModelRef:
    ref = resolve_model(model_dir, name, version)
    tmp = model_dir / (PROMOTED_FILE + ".tmp")
    tmp.write_text(json.dumps({"name": name, "version": version}) + "\n")
    tmp.replace(model_dir / PROMOTED_FILE)  # atomic: workers never read half a promotion
    return ref


def resolve_model(model_dir: Path, name: str = "", version: str = "") -> ModelRef:
    """The model to serve: explicit name/version, else the promoted one, else the only/newest one."""
    model_dir = Path(model_dir)
    if is_model_folder(model_dir) and not name:
        return ModelRef(model_dir, read_card(model_dir))  # pointed straight at one model folder
    refs = list_models(model_dir)
    if not name and not version and (chosen := promoted(model_dir)):
        name, version = chosen
    if name:
        refs = [r for r in refs if r.path.parent.name == name]
    if version:
        refs = [r for r in refs if r.path.name == version]
    if not refs:
        wanted = f" {name or '*'}/{version or '*'}" if (name or version) else ""
        raise ModelNotFound(
            f"no model{wanted} in {model_dir.resolve()}. Train one with "
            "`brainscan train --data DIR --out models/<name>/<version>`, or copy a SavedModel folder "
            "to models/<name>/<version>/ (see README, 'Models').",
            f"{NO_MODEL}:{wanted} not installed" if wanted else NO_MODEL,
        )
    names = {r.path.parent.name for r in refs}
    if len(names) > 1 and version:
        # A version alone names no model (a promotion applies only when neither is set), whether or
        # not one is promoted: say so rather than "none promoted".
        raise ModelNotFound(
            f"several models in {model_dir} ({', '.join(sorted(names))}) have version {version}: "
            "a version alone does not choose a model; set BRAINSCAN_MODEL_NAME too",
            f"{NO_MODEL}: several models have version {version} and the server names none of them",
        )
    if len(names) > 1:
        raise ModelNotFound(
            f"several models in {model_dir} ({', '.join(sorted(names))}) and none promoted: "
            "run `brainscan models promote NAME VERSION` or set BRAINSCAN_MODEL_NAME",
            f"{NO_MODEL}: several models are installed and none is promoted",
        )
    return refs[-1]
