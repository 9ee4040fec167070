"""API keys as FastAPI dependencies: scoring routes need a scoring or admin key, admin routes an admin key.

Keys come from the environment variables the config names
(``serving.api_keys_env``, ``serving.admin_keys_env``), read when the replica
starts, one set per replica process. With no key configured at all, every
route is open.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from serve.grading.config import ServingConfig
from serve.service.errors import ApiError

_BEARER = {"WWW-Authenticate": "Bearer"}


class ApiKeys:
    """The keys a replica accepts."""

    def __init__(self, serving: ServingConfig):
        self.user = serving.api_keys()
        self.admin = serving.admin_keys()

    def check(self, authorization: str, admin: bool) -> None:
        """Raise 401 (no or unknown key) or 403 (scoring key on an admin route) unless the header is good enough."""
        if not self.user and not self.admin:
            return
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if not token:
            raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <key>' header", _BEARER)
        is_admin = _matches(token, self.admin)
        if not (is_admin or _matches(token, self.user)):
            raise ApiError(401, "unauthorized", "invalid API key", _BEARER)
        if admin and not is_admin:
            raise ApiError(403, "forbidden", "this call needs an admin key")


def _matches(token: str, keys: list[str]) -> bool:
    given = token.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(given, k.encode("utf-8", "surrogateescape")) for k in keys)


#: The keys of this replica process (Serve runs one replica per process), set by :func:`use_keys`.
_keys: ApiKeys | None = None


def use_keys(keys: ApiKeys) -> None:
    """Make ``keys`` the ones this process's routes check."""
    global _keys
    _keys = keys


def _check(request: Request, admin: bool) -> None:
    if _keys is None:
        raise ApiError(503, "not_ready", "the service is starting")
    _keys.check(request.headers.get("authorization", ""), admin=admin)


async def require_user(request: Request) -> None:
    """Dependency of scoring routes."""
    _check(request, admin=False)


async def require_admin(request: Request) -> None:
    """Dependency of admin routes."""
    _check(request, admin=True)
