"""Bearer-token API keys for HTTP services: load keys from the environment or a secret file, check
``Authorization: Bearer <key>`` in constant time.

Generic (no Serve, no model): any FastAPI app adds ``Depends(auth.dependency())`` to its routes.
Keys are never taken from requests, configs or logs; only their count is logged. Hand-written
because FastAPI's ``HTTPBearer`` only parses the header and leaves the comparison to the app.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from embedforge.errors import ConfigError

log = logging.getLogger(__name__)


def load_api_keys(env_var: str | None = None, file: str | os.PathLike | None = None) -> list[str]:
    """Keys from ``$env_var`` (comma-separated) and/or ``file`` (one per line, '#' comments)."""
    keys: list[str] = []
    if env_var:
        keys += [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"api_keys_file {str(path)!r} does not exist; mount the secret file or fix the path")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """Checks bearer tokens against a fixed key set, in constant time per key.

    ``ApiKeyAuth(None)`` means auth is explicitly disabled: every request passes and a warning
    is logged once at construction.
    """

    def __init__(self, keys: Iterable[str] | None):
        self.enabled = keys is not None
        self._keys = [k.encode() for k in (keys or [])]
        if not self.enabled:
            log.warning("AUTH DISABLED: every request is accepted without an API key; use only on a trusted host")
        elif not self._keys:
            raise ConfigError("auth is on but no API keys were loaded; set the keys' environment variable or file, "
                              "or disable auth explicitly for local use")
        else:
            log.info("auth: %d API key(s) loaded", len(self._keys))

    @classmethod
    def from_settings(cls, mode: str, env_var: str | None = None, file: str | None = None) -> ApiKeyAuth:
        if mode == "disabled":
            return cls(None)
        keys = load_api_keys(env_var, file)
        if not keys:
            where = " or ".join(x for x in (f"${env_var}" if env_var else "", file or "") if x)
            raise ConfigError(f"auth is on but {where} holds no API keys; set it, or set auth.mode=disabled")
        return cls(keys)

    def check(self, authorization: str | None) -> bool:
        """True when the header carries a valid key (or auth is disabled)."""
        if not self.enabled:
            return True
        token = parse_bearer(authorization)
        if token is None:
            return False
        given = token.encode()
        ok = False
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        return ok

    def dependency(self) -> Any:
        """A FastAPI dependency checking this instance's keys (see :func:`bearer_dependency`)."""
        return bearer_dependency(lambda: self)


# One checker per app name in this process. Serve apps load their keys in the ingress replica's
# constructor; the FastAPI app and the ingress class reach Serve pickled separately (the class by
# value), so the checker lives here, in an importable module both find by reference.
_REPLICA_AUTH: dict[str, ApiKeyAuth] = {}


def set_replica_auth(app: str, auth: ApiKeyAuth) -> None:
    """Install ``auth`` as the checker of ``app`` in this process (call it in the replica's constructor)."""
    _REPLICA_AUTH[app] = auth


def replica_auth(app: str) -> ApiKeyAuth:
    """The checker :func:`set_replica_auth` installed for ``app`` in this process."""
    try:
        return _REPLICA_AUTH[app]
    except KeyError:
        raise RuntimeError(f"no API-key checker set for app {app!r} in this process; "
                           "call set_replica_auth in the replica's constructor") from None


def replica_bearer_dependency(app: str) -> Any:
    """:func:`bearer_dependency` reading the checker installed for ``app`` in the serving replica."""
    return bearer_dependency(functools.partial(replica_auth, app))


def bearer_dependency(get_auth: Callable[[], ApiKeyAuth]) -> Any:
    """A FastAPI dependency raising 401 (with ``WWW-Authenticate: Bearer``) for a missing or bad key.

    ``get_auth`` is called per request, so the keys can be loaded where the app runs (e.g. in a
    Serve replica's constructor) rather than where the app object is built. The route also gets
    the bearer security scheme in its OpenAPI schema.
    """
    from fastapi import HTTPException, Security
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")

    async def require_key(creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        header = f"{creds.scheme} {creds.credentials}" if creds else None
        if not get_auth().check(header):
            raise HTTPException(
                status_code=401,
                detail="missing or invalid API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_key
