"""Every use of Ray internals in the project: written for ray 2.60.0, refused by any other release.

Ray marks its public API (``@PublicAPI``, the documented ``ray.serve``
modules); ``ray._private``, ``ray.serve._private``, underscore names and the
texts of its error messages it may change in any release. What the project
needs of them is here and nowhere else (``tests/test_fences.py`` checks that):

- Serve's request context, for the id of the request being answered
  (:func:`serve_request_id`; Ray 2.60 exports no public accessor);
- ``ray.init``'s ``_system_config`` (:func:`system_config_kwargs`);
- Serve's import-path resolver (:func:`import_path_target`, for the checks);
- the addresses of the ingress replicas' own HTTP servers (Serve's direct
  ingress), which the project's HAProxy edge forwards to
  (:func:`ingress_targets`, from the controller's target groups);
- the words of the texts Serve's proxy answers with when it sheds load or a
  replica is gone (:func:`is_backpressure_text`, :func:`is_replica_gone_text`),
  checked by the tests against the texts the real proxy sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

WRITTEN_FOR = "2.60.0"
if ray.__version__ != WRITTEN_FOR:
    raise ImportError(
        f"serve.runtime.ray_private was written for ray {WRITTEN_FOR}, but ray {ray.__version__} is installed: "
        f"install ray=={WRITTEN_FOR} (scripts/install.sh) or re-check this module against the new release"
    )


def serve_request_id() -> str:
    """Ray Serve's id of the request being answered (also in its access logs and X-Request-ID); "" outside one."""
    from ray.serve.context import _get_serve_request_context  # loads Serve: only where a request is answered

    return _get_serve_request_context().request_id or ""


def system_config_kwargs(system_config: dict) -> dict:
    """The keyword arguments of ``ray.init`` that start a local Ray with ``system_config``."""
    return {"_system_config": system_config}


#: Words of the proxy's own 503 text when a deployment's queue is full
#: ("Request dropped due to backpressure (num_queued_requests=5, max_queued_requests=5).").
BACKPRESSURE_WORDS = ("back", "queue")
#: Words in the proxy's own 500 text that mean a replica died or cannot be reached.
REPLICA_GONE_WORDS = (
    "ActorDiedError",
    "ActorUnavailableError",
    "RayActorError",
    "DeploymentUnavailableError",
    "unavailable",
    "died",
)


def is_backpressure_text(text: str) -> bool:
    """Whether a 503 text of Serve's proxy says it shed the request for a full queue."""
    return any(w in text.lower() for w in BACKPRESSURE_WORDS)


def is_replica_gone_text(text: str) -> bool:
    """Whether a 500 text of Serve's proxy says a replica died or cannot be reached (retryable)."""
    return any(w in text for w in REPLICA_GONE_WORDS)


def import_path_target(path: str):
    """What Serve resolves an import path such as a deployment's ``request_router_class`` to."""
    from ray._common.utils import import_attr  # Serve's own resolver, for the checks that use it

    return import_attr(path)


@dataclass(frozen=True)
class IngressTarget:
    """One HTTP server a request to an application can go to: an ingress replica's (direct ingress) or, while the
    application has no running replica, a Serve proxy's."""

    node_ip: str
    port: int
    name: str  #: Serve's name of the replica or proxy

    @property
    def is_replica(self) -> bool:
        return self.name.startswith("SERVE_REPLICA::")


def ingress_targets(app_name: str) -> list[IngressTarget]:
    """Where Serve's controller says the HTTP requests of ``app_name`` go now (its ingress replicas' direct-ingress
    servers once they run; Serve's proxies before). Needs ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the cluster."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(app_name, from_proxy_manager=True), timeout=10)
    return [
        IngressTarget(t.ip, t.port, t.name)
        for g in groups
        if g.protocol == RequestProtocol.HTTP and g.app_name in (app_name, "", None)
        for t in g.targets
        if t.port
    ]
