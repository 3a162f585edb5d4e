"""``/v1/models``: which model the workers serve, from its card."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, status

from api.deps import CallerDep, SettingsDep
from api.schemas import Problem, ServedModel
from brainscan.modelrepo import ModelNotFound, public_reason, resolve_model
from brainscan.variants import choose_variant

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    response_model=ServedModel,
    responses={
        401: {"model": Problem, "description": "Missing or invalid API key."},
        503: {"model": Problem, "description": "No model to serve."},
    },
)
def served_model(_caller: CallerDep, settings: SettingsDep) -> dict[str, Any]:
    """The model being served: name, version, classes, input contract, metrics, and which variant
    (fp32 SavedModel or int8 TFLite) this machine serves and why."""
    try:
        ref = resolve_model(settings.model_dir, settings.model_name, settings.model_version)
    except (ModelNotFound, OSError, ValueError) as exc:
        # The full text (model folder, card errors) is for the operator's log only.
        log.warning("GET /v1/models: no model to serve: %s", exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=public_reason(exc)) from None
    card = ref.card
    spec = card.input_spec
    return {
        "name": card.name,
        "version": card.version,
        "classes": list(card.classes),
        "input": {
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
            "preprocessing": spec.preprocessing,
            "crop": spec.crop,
        },
        "architecture": card.architecture,
        "format": card.format,
        "variant": choose_variant(card, ref.path, settings.model_format).as_dict(),
        "card_less": card.card_less,
        "metrics": card.metrics,
        "created_at": card.created_at,
    }
