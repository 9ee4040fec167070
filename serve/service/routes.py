"""The HTTP API's routes in one table: the ingress declares its routes from it, the proxy guard reads it.

The proxy guard (:mod:`serve.service.proxy_guard`) runs in Ray Serve's
proxies, before any replica or FastAPI sees a request, so it cannot ask the
application which route a request is for. It asks this table: how large a
body the route takes (:class:`Body`, sized by
:class:`serve.service.uploads.UploadLimits`), whether it needs an admin key,
and whether it is a health or readiness probe (never refused for its client's
other requests). The ingress declares each of its routes from a row here
(method, path, operation name and key), and ``tests/test_hardening.py`` holds
the application's routes to the table, so a route added without a row cannot
reach the guard's small default body limit unnoticed.

Pure data: no FastAPI, nothing the proxy does not already import.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

API_VERSION = "v1"


class Body(enum.Enum):
    """What a route's body holds, which sets its size limit."""

    NONE = "none"  #: no body (or a small one): the limit of any route
    ANSWER = "answer"  #: one answer's audio: a multipart file, or base64 in JSON (4/3 as large)
    BATCH = "batch"  #: a candidate's answers, base64 in JSON
    PART = "part"  #: a part's registration (a path, a task text, levels)


class Access(enum.Enum):
    """The key a route needs (with keys configured)."""

    PUBLIC = "public"
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class Route:
    """One route of the API: method, path (``{name}`` for a path segment), operation name and what it takes."""

    method: str
    path: str
    name: str
    body: Body = Body.NONE
    access: Access = Access.PUBLIC
    probe: bool = False  #: a health or readiness probe
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = "".join(
            "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]+\})", self.path) if part
        )
        object.__setattr__(self, "pattern", re.compile(regex))

    def matches(self, method: str, path: str) -> bool:
        """Whether a request of ``method`` to ``path`` is this route's (HEAD is GET's; one trailing slash is
        ignored, as the application redirects it)."""
        method = "GET" if method == "HEAD" else method
        return method == self.method and self.pattern.fullmatch(_without_trailing_slash(path)) is not None


def _without_trailing_slash(path: str) -> str:
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


SCORE = Route("POST", f"/{API_VERSION}/score", "score", Body.ANSWER, Access.USER)
SCORE_JSON = Route("POST", f"/{API_VERSION}/score/json", "score_json", Body.ANSWER, Access.USER)
SCORE_BATCH = Route("POST", f"/{API_VERSION}/score/batch", "score_batch", Body.BATCH, Access.USER)
LIST_PARTS = Route("GET", f"/{API_VERSION}/parts", "list_parts", access=Access.USER)
PUT_PART = Route("PUT", f"/{API_VERSION}/parts/{{part}}", "put_part", Body.PART, Access.ADMIN)
DELETE_PART = Route("DELETE", f"/{API_VERSION}/parts/{{part}}", "delete_part", access=Access.ADMIN)
HEALTHZ = Route("GET", "/healthz", "healthz", probe=True)
READYZ = Route("GET", "/readyz", "readyz", probe=True)
METRICS = Route("GET", "/metrics", "metrics")
PAGE = Route("GET", "/", "index")

#: Every route of the application but the API document's own (``/openapi.json``, ``/docs``).
ROUTES: tuple[Route, ...] = (
    SCORE,
    SCORE_JSON,
    SCORE_BATCH,
    LIST_PARTS,
    PUT_PART,
    DELETE_PART,
    HEALTHZ,
    READYZ,
    METRICS,
    PAGE,
)

#: Ray Serve's own probes, which its proxy answers itself.
SERVE_PROBE_PATHS = frozenset({"/-/healthz", "/-/routes"})
#: Paths of health and readiness probes (ours and Ray Serve's): never refused by a per-client limit.
PROBE_PATHS = frozenset(r.path for r in ROUTES if r.probe) | SERVE_PROBE_PATHS


def route_of(method: str, path: str) -> Route | None:
    """The route a request of ``method`` to ``path`` is for; None if none (the application answers 404 or 405)."""
    return next((r for r in ROUTES if r.matches(method, path)), None)
