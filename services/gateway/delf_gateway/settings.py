"""The gateway's settings, read from the environment once, when the gateway is built.

``GatewaySettings.from_env()`` is the one place the gateway reads its DELF_* settings
(declared in ``delf_common.config.SETTINGS``); `build_server` builds one and hands it to
the servicer (``WorkerCalls.settings``), the interceptors, TLS and the health watcher.
A request never reads the environment. ``HealthcheckSettings`` is the container
healthcheck's (``delf_gateway.healthcheck``, a process of its own).
"""
from __future__ import annotations

import dataclasses

from delf_common import config
from delf_common.fetch import FetchPolicy
from delf_common.images import ImageLimits
from delf_common.jobs import JobTimings


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    grpc_addr: str
    max_message_bytes: int
    auth_tokens: tuple[str, ...]
    tls_cert: str
    tls_key: str
    model: str  # reported by GetStats
    task_timeout_s: float
    max_queue: int
    max_searches: int
    shortlist: int
    verified_score: float  # sent to the verifiers
    ransac_px: float  # sent to the verifiers
    job_stalled_after_s: float
    job_resume_after_s: float
    visibility_timeout_s: float  # quoted by a stalled job's hint
    health_interval_s: float
    health_require: tuple[str, ...]
    metrics_port: int
    image_limits: ImageLimits  # a photo's header checks (check_photo)
    fetch_policy: FetchPolicy  # a URL item's checks (check_location)
    queue_prefix: str  # DELF_QUEUE_PREFIX: the workers' queue and heartbeat key names
    skip_duplicates: bool = False  # DELF_DUPLICATES=skip

    @property
    def job_timings(self) -> JobTimings:
        """The job store's: when a job is stalled, and what its hint quotes."""
        return JobTimings(stalled_after_s=self.job_stalled_after_s, resume_after_s=self.job_resume_after_s,
                          visibility_timeout_s=self.visibility_timeout_s)

    @classmethod
    def from_env(cls) -> "GatewaySettings":
        return cls(
            grpc_addr=config.get("DELF_GRPC_ADDR"),
            max_message_bytes=config.get("DELF_MAX_MESSAGE_BYTES"),
            auth_tokens=tuple(config.get("DELF_AUTH_TOKENS")),
            tls_cert=config.get("DELF_TLS_CERT"),
            tls_key=config.get("DELF_TLS_KEY"),
            model=config.get("DELF_MODEL"),
            task_timeout_s=config.get("DELF_TASK_TIMEOUT_S"),
            max_queue=config.get("DELF_MAX_QUEUE"),
            max_searches=config.get("DELF_MAX_SEARCHES"),
            shortlist=config.get("DELF_SHORTLIST"),
            verified_score=config.get("DELF_VERIFIED_SCORE"),
            ransac_px=config.get("DELF_RANSAC_PX"),
            job_stalled_after_s=config.get("DELF_JOB_STALLED_AFTER_S"),
            job_resume_after_s=config.get("DELF_JOB_RESUME_AFTER_S"),
            visibility_timeout_s=config.get("DELF_VISIBILITY_TIMEOUT_S"),
            health_interval_s=config.get("DELF_HEALTH_INTERVAL_S"),
            health_require=tuple(config.get("DELF_HEALTH_REQUIRE")),
            metrics_port=config.get("DELF_METRICS_PORT"),
            image_limits=ImageLimits.from_env(),
            fetch_policy=FetchPolicy.from_env(),
            queue_prefix=config.get("DELF_QUEUE_PREFIX"),
            skip_duplicates=config.get("DELF_DUPLICATES") == "skip",
        )


@dataclasses.dataclass(frozen=True)
class HealthcheckSettings:
    """What the container healthcheck needs: the gateway's address and its TLS files."""

    grpc_addr: str
    tls_ca: str
    tls_cert: str

    @classmethod
    def from_env(cls) -> "HealthcheckSettings":
        return cls(grpc_addr=config.get("DELF_GRPC_ADDR"), tls_ca=config.get("DELF_TLS_CA"),
                   tls_cert=config.get("DELF_TLS_CERT"))
