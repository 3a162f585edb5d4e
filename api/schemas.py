"""Response shapes, for the OpenAPI document (the dicts themselves come from brainscan.results)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from brainscan.results import FlagFilter, ItemOrder


class Problem(BaseModel):
    detail: str


class JobAccepted(BaseModel):
    id: str
    status: str
    total: int
    failed: int
    enqueued: bool
    status_url: str


class ModelVersion(BaseModel):
    name: str | None
    version: str | None


class Timings(BaseModel):
    created_at: str | None
    enqueued_at: str | None
    started_at: str | None
    finished_at: str | None
    preprocess_ms: float | None
    inference_ms: float | None


class ItemOut(BaseModel):
    id: int
    position: int
    filename: str
    source_ref: str | None
    sha256: str | None
    status: str
    label: str | None = Field(description="The predicted class; null when out of scope, failed or pending.")
    confidence: float | None = Field(
        description="Calibrated probability that `label` is right (the model card's temperature); "
        "null when there is no label."
    )
    flag: Literal["uncertain", "out_of_scope"] | None = Field(
        description="null: within the model's scope and confident. `uncertain`: label kept, confidence "
        "below the threshold. `out_of_scope`: not a scan this model was made for; no label."
    )
    flag_reason: str | None = Field(description="Why the item is flagged, for people; null when not flagged.")
    scope_score: float | None = Field(
        description="Distance from the model's training data over its threshold: above 1 is out of scope. "
        "null when the model has no scope detector (a card-less or uncalibrated model)."
    )
    probabilities: dict[str, float | None] | None = Field(
        description="Calibrated class probabilities; kept for out-of-scope items for audit only."
    )
    error: str | None
    model: ModelVersion
    attempts: int
    worker_id: str | None = Field(
        description="The worker (Celery node name) that last took the item; null while it waits."
    )
    timings: Timings


class FlagCounts(BaseModel):
    uncertain: int
    out_of_scope: int


class JobSummary(BaseModel):
    id: str
    status: str
    finished: bool
    total: int
    done: int
    failed: int
    pending: int
    flags: FlagCounts | None = Field(
        description="Scored items per flag; null for a job scored before flags existed."
    )
    model: ModelVersion
    source: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class ItemPage(BaseModel):
    offset: int
    limit: int
    returned: int
    next_offset: int | None
    flag: FlagFilter | None = Field(description="The `flag` filter this page was selected with.")
    order: ItemOrder


class JobOut(JobSummary):
    items: list[ItemOut]
    page: ItemPage


class JobPage(BaseModel):
    offset: int
    limit: int
    total: int


class JobList(BaseModel):
    jobs: list[JobSummary]
    page: JobPage


class ServedModel(BaseModel):
    name: str
    version: str
    classes: list[str]
    input: dict
    architecture: str
    format: str
    # Which variant this machine serves and why (brainscan.variants): served, reason,
    # fp32_val_accuracy, int8_val_accuracy, cpu_int8_flag.
    variant: dict
    card_less: bool
    metrics: dict
    created_at: str | None
