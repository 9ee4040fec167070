"""The HTTP service's settings: the ``serving:`` section of the grader config.

Where the service listens, its two Ray Serve deployments (replicas, admission
limits, resources), its keys, its part registry and the bounds its proxies
enforce. The grading core reads the rest of the file
(:class:`serve.grading.config.GraderConfig`); :class:`ServiceConfig` adds this
section's schema, and every ``l2grader`` command loads configs with it
(:func:`load_service_config`), so a mistake under ``serving:`` is reported by
any command, in the same words as one elsewhere in the file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve.grading.config import GraderConfig, StrictModel, beside, clip, load_config
from serve.grading.registry import PartRegistry, default_registry_file


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling bounds of one deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica the autoscaler aims at."
    )
    # None: Ray Serve's default (upscale 30 s, downscale 600 s, look-back 30 s).
    upscale_delay_s: float | None = Field(
        None, ge=0, description="Load above target this long before a replica is added."
    )
    downscale_delay_s: float | None = Field(
        None, ge=0, description="Load below target this long before a replica is removed."
    )
    look_back_period_s: float | None = Field(None, gt=0, description="Window the autoscaler averages the load over.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class DeploymentConfig(StrictModel):
    """One Ray Serve deployment: replicas, admission limit, resources."""

    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests a replica admits at once; beyond this callers get 503 + Retry-After."
    )
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting for a replica beyond which new ones are refused (503)."
    )
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a 503 under overload.")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="A stopping replica finishes its requests for at most this long (None: Serve's 20 s)."
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many replicas on one Ray node (None: no limit)."
    )


def _ingress_default() -> DeploymentConfig:
    return DeploymentConfig(
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=16),
        max_ongoing_requests=64,
        num_cpus=1.0,
    )


def _scorer_default() -> DeploymentConfig:
    return DeploymentConfig(
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=48),
        max_ongoing_requests=128,
        num_cpus=1.0,
        num_gpus=0.0,
    )


class ServingConfig(StrictModel):
    """The HTTP service (Ray Serve): where it listens, its deployments, its keys and registry."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    edge: Literal["auto", "haproxy", "ray_proxy"] = Field(
        "auto",
        description="What clients connect to: the project's HAProxy in front of the ingress replicas (haproxy), or "
        "Ray Serve's Python proxy (ray_proxy); auto: HAProxy with a Ray of the service's own, Serve's proxy when "
        "joined to a cluster (whose manifests run the edge). See docs/operating.md#the-edge.",
    )
    ingress: DeploymentConfig = Field(default_factory=_ingress_default)
    scorer: DeploymentConfig = Field(default_factory=_scorer_default)
    adapters_per_replica: int = Field(8, ge=1, description="Adapters a scorer replica keeps loaded (LRU).")
    spread_part_at: int | None = Field(
        4,
        ge=1,
        description="A part's answers go to other scorer replicas too once the replicas holding its adapter "
        "have this many more in flight than the least busy one (null: Ray Serve's routing, which keeps a part on "
        "its replicas until they are full).",
    )
    decode_workers: int | None = Field(
        None, ge=1, description="Answers an ingress replica decodes at once (default: its num_cpus, at least 1)."
    )
    registry_file: Path | None = Field(
        None, description="Where admin changes to the part registry persist (default: beside the config)."
    )
    api_keys_env: str | None = Field(None, description="Env var holding comma-separated scoring API keys.")
    admin_keys_env: str | None = Field(None, description="Env var holding comma-separated admin API keys.")
    allow_unauthenticated: bool = Field(
        False, description="Without any API key, accept clients beyond this machine (loopback only otherwise)."
    )
    adapter_roots: list[Path] | None = Field(
        None,
        description="Folders PUT /v1/parts may take adapters from (default: the folders of the config's adapters).",
    )
    max_unsized_body_mb: float = Field(
        8.0,
        gt=0.0,
        description="Largest request body sent without a Content-Length (chunked): Ray Serve's proxy streams such a "
        "body to the ingress faster than it is read, so the limit that bounds the ingress's memory must be small.",
    )
    max_batch_answers: int = Field(64, ge=1, description="Answers one POST /v1/score/batch may carry.")
    max_batch_audio_s: float = Field(3600.0, gt=0.0, description="Seconds of audio one batch request may carry in all.")
    max_batch_upload_mb: float = Field(200.0, gt=0.0, description="Largest batch request body.")
    body_timeout_s: float = Field(
        60.0, gt=0, description="Time a client has to send a whole request body; slower ones get 408 and are closed."
    )
    max_requests_per_client: int = Field(
        200, ge=1, description="Requests one client address may hold open at once (429 beyond)."
    )
    max_buffered_mb: float = Field(
        1024.0, gt=0, description="Request bodies a proxy holds in memory at once, all clients together (503 beyond)."
    )
    max_header_kb: float = Field(
        32.0, gt=0, description="Request line and headers of one request together, at most (431 beyond)."
    )
    max_headers: int = Field(100, ge=1, description="Header fields of one request, at most (431 beyond).")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's line and headers, counted from the connection's opening "
        "or the request's first byte (408 and closed beyond).",
    )
    keep_alive_timeout_s: float = Field(
        75.0,
        gt=0,
        description="An idle keep-alive connection is closed after this long (longer than a load balancer's idle "
        "timeout, 60 s on common ones, so the balancer closes first).",
    )
    max_connections: int = Field(
        4096, ge=1, description="Open connections one proxy holds, all clients together (503 and closed beyond)."
    )
    max_connections_per_client: int = Field(
        256,
        ge=1,
        description="Open connections one client address may hold (429 and closed beyond; health probes and "
        "trusted_proxies excepted).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of the load balancers whose X-Forwarded-For / X-Forwarded-Proto "
        "the proxy believes; the per-client limits then count the address they name. None by default.",
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest a request may take end to end (the proxy answers 408 beyond); a client may ask for "
        "less with x-request-timeout-seconds, never for more or none.",
    )
    log_encoding: Literal["JSON", "TEXT"] = Field(
        "JSON", description="Ray Serve's log lines of both deployments: one JSON object per line, or plain text."
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{clip(net)!r} is not an IP address or network") from None
        return v


class ServiceConfig(GraderConfig):
    """The whole config file as the service reads it: the grading settings and the ``serving:`` section."""

    serving: ServingConfig = Field(default_factory=ServingConfig)

    def resolve_paths(self, base_dir: Path) -> None:
        super().resolve_paths(base_dir)
        s = self.serving
        if s.registry_file is not None:
            s.registry_file = beside(base_dir, s.registry_file)
        if s.adapter_roots is not None:
            s.adapter_roots = [beside(base_dir, r) for r in s.adapter_roots]


def load_service_config(path: str | Path) -> ServiceConfig:
    """Read and validate a config file, ``serving:`` included (:class:`ConfigError` says where and why)."""
    return load_config(path, ServiceConfig)


def part_registry(cfg: ServiceConfig, config_path: str | Path) -> PartRegistry:
    """The part registry the config names: ``serving.registry_file`` (default: beside the config file), admin
    adapters from ``serving.adapter_roots``."""
    s = cfg.serving
    return PartRegistry(cfg, s.registry_file or default_registry_file(config_path), s.adapter_roots)
