"""The one settings object: every `TRANSCODER_*` environment variable, with its default."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment configuration (prefix `TRANSCODER_`). The README lists every field."""

    model_config = SettingsConfigDict(env_prefix="TRANSCODER_", extra="ignore")

    # --- services -------------------------------------------------------------------------
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: SecretStr = SecretStr("minioadmin")
    s3_secret_key: SecretStr = SecretStr("minioadmin")
    s3_secure: bool = False
    s3_region: str = "us-east-1"

    # --- destinations and triggers --------------------------------------------------------
    on_success: str | None = None
    on_failure: str | None = "task:transcoder.dest_fail"
    webhook_token: SecretStr | None = None
    triggers: Path | None = None

    # --- job policy -----------------------------------------------------------------------
    max_retries: int = Field(2, ge=0, description="retries of a transient error")
    retry_min_backoff_s: float = 2.0
    retry_max_backoff_s: float = 300.0
    max_event_age_s: float = 6 * 3600
    job_time_limit_s: float = 24 * 3600
    record_retention_s: int = 7 * 24 * 3600
    log_max_lines: int = 2000
    lease_ttl_s: float = 45.0
    heartbeat_interval_s: float = 15.0
    reaper_interval_s: float = 10.0
    progress_interval_s: float = 1.0
    delivery_max_attempts: int = 5
    # above the longest job: a message is redelivered after this many seconds unacked
    visibility_timeout_s: int = 26 * 3600

    # --- engine limits --------------------------------------------------------------------
    work_dir: Path = Path("/tmp/transcoder")
    max_source_bytes: int = 50 * 1024**3
    max_pixels: int = 8192 * 4320
    max_duration_s: float = 48 * 3600
    min_free_disk_bytes: int = 512 * 1024**2
    ffmpeg_threads: int = 0  # 0 lets ffmpeg choose
    stall_timeout_s: float = 120.0
    probe_timeout_s: float = 30.0
    hls_segment_s: float = 6.0

    # --- HTTP API -------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_max_body_bytes: int = 1024 * 1024


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
