"""One settings object for every process, read from ``BRAINSCAN_*`` environment variables.

Defaults are the embedded stack's: a SQLite file, a Redis started by ``brainscan up`` and storage
under ``var/``. A distributed deployment overrides them through the environment only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRAINSCAN_", env_file=None, extra="ignore")

    # Where state lives.
    var_dir: Path = Field(Path("var"), description="Root for the embedded stack's files.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite under var_dir.")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis).")
    storage_dir: Path | None = Field(None, description="Content-addressed scan store; var_dir/storage.")
    model_dir: Path = Field(Path("models"), description="Model repository: <name>/<version>/.")
    model_name: str = Field("", description="Model to serve; empty means the promoted/only one.")
    model_version: str = Field("", description="Version to serve; empty means the promoted/newest.")

    # Serving.
    batch_size: int = Field(32, ge=1, le=1024, description="Largest batch a worker scores at once.")
    max_batch_wait_ms: int = Field(50, ge=0, le=60_000, description="Longest wait to fill a batch.")
    enqueue_chunk: int = Field(
        64, ge=1, le=1024, description="Items per queued message (64: one intake chunk, one worker flush)."
    )
    tf_threads: int = Field(
        0,
        ge=0,
        description="Threads per worker process for TensorFlow's intra-op pool, the TFLite "
        "interpreter and the decode pool; 0 = all cores (decode: up to 4). With N workers on one "
        "machine use cores / N.",
    )
    urgent_max_items: int = Field(
        8,
        ge=0,
        description="Jobs of at most this many scans are queued ahead of bulk work (Redis priority), "
        "so a single scan does not wait behind a queued archive; 0 = no priority lane.",
    )
    model_format: Literal["", "savedmodel", "tflite", "tflite-int8"] = Field(
        "",
        description="Which variant of the model to serve: the SavedModel, or a TFLite file written by "
        "`brainscan export --tflite/--int8`; empty means the int8 variant where the CPU has VNNI/AMX and "
        "the card shows it within 0.3 points of fp32, else the card's own format (brainscan/variants.py).",
    )
    uncertain_below: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Flag a result 'uncertain' when its (calibrated) confidence is below this; empty "
        "means the model card's threshold (chosen so unflagged validation scans are >= 99.5% correct), "
        "else 0.9 for a model without one.",
    )
    visibility_timeout_s: int = Field(
        300, ge=10, description="Seconds before Redis redelivers a message a dead worker held."
    )

    # Intake limits: every one of them bounds what a client can make us store or expand.
    max_request_bytes: int = Field(512 * MIB, ge=1, description="Largest upload body per request.")
    max_archive_entries: int = Field(20_000, ge=1, description="Most entries read from one archive.")
    max_expanded_bytes: int = Field(2048 * MIB, ge=1, description="Most bytes expanded per request.")
    max_scan_bytes: int = Field(64 * MIB, ge=1, description="Largest single scan file.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest decoded image (w*h).")
    max_items_per_job: int = Field(20_000, ge=1, description="Most scans one job may hold.")
    max_request_entries: int = Field(
        100_000, ge=1, description="Most archive entries examined in one request (skipped ones included)."
    )
    max_intake_cpu_s: float = Field(
        5.0, gt=0, description="CPU seconds intake may spend on one request, plus the per-MiB allowance."
    )
    max_intake_cpu_s_per_mib: float = Field(
        1.0, ge=0, description="CPU seconds intake may spend per MiB uploaded, on top of max_intake_cpu_s."
    )
    upload_timeout_s: float = Field(600.0, gt=0, description="Longest time one upload body may take (408).")
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="Longest pause between two chunks of an upload body (408)."
    )
    max_expansion_ratio: int = Field(
        64,
        ge=1,
        description="One request expands at most this many times its upload size (and at least "
        "max_volume_bytes; never past max_expanded_bytes): decompressing costs CPU.",
    )
    max_stored_ratio: int = Field(
        16,
        ge=1,
        description="One request stores at most this many times its upload size in scans (and at least "
        "max_scan_bytes): a small archive of padding cannot fill the disk.",
    )
    # Scanner files (DICOM, NIfTI; brainscan/scanners.py), checked from the header before pixel work.
    max_volume_slices: int = Field(
        2048, ge=1, description="Most axial slices of one NIfTI volume or frames of one DICOM file."
    )
    max_volume_voxels: int = Field(
        512**3, ge=1, description="Most voxels (pixels, all frames) in one NIfTI or DICOM file."
    )
    max_volume_bytes: int = Field(
        512 * MIB,
        ge=1,
        description="Largest decoded scanner file: an uncompressed .nii (so the temporary file a "
        ".nii.gz becomes) or a DICOM file's decoded pixel data.",
    )

    # Storage lifecycle (brainscan/storage.py).
    retention_days: int = Field(
        30,
        ge=0,
        description="Jobs (with their results) finished more than this many days ago are deleted, "
        "and their scans unless a newer job holds them too; 0 = keep for ever.",
    )
    retention_cron: str = Field(
        "30 3 * * *", description="Crontab (UTC) for the daily retention purge and storage/tmp sweep."
    )
    quota_scans_per_day: int = Field(
        100_000,
        ge=0,
        description="Items (scans, and files that failed at intake) one API key may submit per UTC day "
        "(429 past it); 0 = no limit.",
    )
    quota_bytes_per_day: int = Field(
        20 * 1024 * MIB,
        ge=0,
        description="Bytes one API key may submit per UTC day: per file, the larger of its bytes received "
        "and the scan bytes it stored (refused files count); 0 = no limit.",
    )

    # HTTP.
    host: str = Field("127.0.0.1", description="Address the API binds (and the CLI calls).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the API.")
    public_url: str = Field(
        "",
        description="Base URL clients reach the API at (status_url, Location); empty means "
        "http://<host>:<port>. Never taken from a request's Host header.",
    )
    broker_timeout_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Connect and read timeout of each Redis operation when publishing: a frozen "
        "broker costs a POST about this long (times the publish retries), then 202 enqueued:false.",
    )

    # Nightly scoring.
    nightly_cron: str = Field("0 2 * * *", description="Crontab (UTC) for the nightly inbox scan.")
    nightly_inbox_dir: Path | None = Field(
        None, description="Folder the nightly run scores (one job per file); var_dir/inbox."
    )
    nightly_settle_s: int = Field(
        60, ge=0, description="Files modified more recently than this are still being copied: skipped."
    )
    nightly_rescore_days: int = Field(
        0, ge=0, description="Re-score the last N days' results not made by the promoted model; 0 = off."
    )
    reaper_interval_s: int = Field(60, ge=1, description="How often stranded items are re-queued.")
    stale_after_s: int = Field(600, ge=10, description="A queued/running item older than this is re-queued.")

    # Worker reliability (see worker/tasks.py).
    max_attempts: int = Field(5, ge=1, description="Deliveries of one item before it fails for good.")
    db_retry_s: int = Field(300, ge=0, description="How long a worker keeps retrying a failed DB write.")

    # Observability (see brainscan/logs.py, api/routes/metrics.py, brainscan/webhooks.py).
    log_format: Literal["json", "text"] = Field("json", description="Log lines as JSON objects or text.")
    log_level: str = Field("INFO", description="Log level of the API and workers.")
    metrics_latency_window: int = Field(
        1000, ge=1, le=100_000, description="Latest finished items the /metrics stage latencies cover."
    )
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries of a job's callback_url.")
    webhook_backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubles each retry.")
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Total deadline of one webhook try (connect, send, answer)."
    )
    webhook_allow: str = Field(
        "",
        description="Comma-separated hosts and CIDRs a callback_url may reach although they are "
        "loopback, link-local, private or otherwise not public (refused by default).",
    )
    webhook_key_concurrency: int = Field(
        1, ge=1, description="Webhook tries of one API key's jobs in flight at once, across workers."
    )

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.var_dir / "storage"

    @property
    def resolved_nightly_inbox_dir(self) -> Path:
        return self.nightly_inbox_dir or self.var_dir / "inbox"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'brainscan.db').resolve()}"

    @property
    def resolved_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def api_key_file(self) -> Path:
        return self.var_dir / "api-key"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
