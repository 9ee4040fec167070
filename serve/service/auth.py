"""API keys as FastAPI dependencies: scoring routes need a scoring or admin key, admin routes an admin key.

Keys come from the environment variables the config names
(``serving.api_keys_env``, ``serving.admin_keys_env``), read when the replica
starts, one set per replica process. It fails closed: a named variable that is
unset or empty stops the replica from starting; scoring keys without admin
keys leave the admin routes shut (403). With no key configured at all, routes
are open to clients on this machine only, unless the config says
``serving.allow_unauthenticated``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from fastapi import Request

from serve.grading.config import ConfigError
from serve.service.errors import ApiError
from serve.service.settings import ServingConfig

_BEARER = {"WWW-Authenticate": "Bearer"}
#: Set by ``l2grader serve --allow-unauthenticated`` for every process of the service.
ALLOW_UNAUTHENTICATED_ENV = "L2GRADER_ALLOW_UNAUTHENTICATED"


def read_keys(env_name: str | None, required: bool = True) -> list[str]:
    """The comma-separated keys held by the environment variable ``env_name`` (none if unnamed).

    Fails closed: :class:`ConfigError` when the config names a variable that is
    unset or holds no key (unless not ``required``), so a deployment whose
    secret did not arrive refuses to start instead of serving without
    authentication.
    """
    if not env_name:
        return []
    keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
    if not keys and required:
        state = "empty" if env_name in os.environ else "not set"
        raise ConfigError(
            f"the config names API key variable {env_name}, but it is {state}: refusing to start "
            "without the keys (set it, or remove it from the config to run without keys)"
        )
    return keys


def api_keys(serving: ServingConfig) -> list[str]:
    """Scoring keys, read from the environment now (:class:`ConfigError` if the named variable is unset)."""
    return read_keys(serving.api_keys_env)


def admin_keys(serving: ServingConfig) -> list[str]:
    """Admin keys, read from the environment now (:class:`ConfigError` if the named variable is unset)."""
    return read_keys(serving.admin_keys_env)


def keyed(serving: ServingConfig) -> bool:
    """Whether the config asks for API keys at all."""
    return bool(serving.api_keys_env or serving.admin_keys_env)


def allow_unauthenticated(serving: ServingConfig) -> bool:
    """Whether a service without API keys may answer clients beyond its own machine."""
    return serving.allow_unauthenticated or os.environ.get(ALLOW_UNAUTHENTICATED_ENV) == "1"


class ApiKeys:
    """The keys a replica accepts."""

    def __init__(self, serving: ServingConfig):
        self.user = api_keys(serving)
        self.admin = admin_keys(serving)
        self.open_to_all = allow_unauthenticated(serving)

    @property
    def keyless(self) -> bool:
        return not self.user and not self.admin

    def check(self, authorization: str, admin: bool, client_host: str | None = None) -> None:
        """Raise 401 (no or unknown key) or 403 (scoring key on an admin route) unless the header is good enough."""
        if self.keyless:
            if not (self.open_to_all or is_loopback(client_host)):
                raise ApiError(
                    403, "forbidden", "this service has no API keys and accepts clients on its own machine only"
                )
            return
        token = _token(authorization)
        if not token:
            raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <key>' header", _BEARER)
        is_admin = _matches(token, self.admin)
        if not (is_admin or _matches(token, self.user)):
            raise ApiError(401, "unauthorized", "invalid API key", _BEARER)
        if admin and not is_admin:
            raise ApiError(403, "forbidden", "this call needs an admin key")

    def is_admin(self, authorization: str, client_host: str | None = None) -> bool:
        """Whether the caller may see admin details (paths): an admin key, or a local caller of a keyless service."""
        if self.keyless:
            return is_loopback(client_host)
        return _matches(_token(authorization), self.admin)


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token(authorization: str) -> str:
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


def _matches(token: str, keys: list[str]) -> bool:
    if not token:
        return False
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
        raise ApiError(503, "not_ready", "the service is starting", {"Retry-After": "5"})
    _keys.check(request.headers.get("authorization", ""), admin=admin, client_host=client_host(request))


def client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def is_admin(request: Request) -> bool:
    """Whether this request may see admin-only details (filesystem paths, failure reasons)."""
    return _keys is not None and _keys.is_admin(request.headers.get("authorization", ""), client_host(request))


async def require_user(request: Request) -> None:
    """Dependency of scoring routes."""
    _check(request, admin=False)


async def require_admin(request: Request) -> None:
    """Dependency of admin routes."""
    _check(request, admin=True)
