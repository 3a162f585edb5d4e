"""Response shapes, for the OpenAPI document (the dicts themselves come from brainscan.results)."""

from __future__ import annotations

from pydantic import BaseModel


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
    label: str | None
    confidence: float | None
    probabilities: dict[str, float | None] | None
    error: str | None
    model: ModelVersion
    attempts: int
    timings: Timings


class JobSummary(BaseModel):
    id: str
    status: str
    finished: bool
    total: int
    done: int
    failed: int
    pending: int
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
    card_less: bool
    metrics: dict
    created_at: str | None
