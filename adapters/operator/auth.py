"""HTTP Basic authentication for the operator's view and its API.

One operator identity (a user name and a password), the password from a file (``password_file``,
re-read when the file changes, so a rotation needs no restart) or an environment variable
(``password_env``); an inline password is for tests and development. Every check compares both
the user and the password in constant time, whatever the outcome of either, so the answer's
timing tells nothing about which one was wrong or how much of it matched.

A refused request gets ``401`` with ``WWW-Authenticate: Basic realm=..., charset="UTF-8"`` (a
browser then asks the operator once and sends the credentials with every later request to the
same origin). Wrong credentials, not a missing header (every browser's first request has none),
are handed to ``on_refused`` (source address, reason, detail) for the audit trail.

Headless browsers take the credentials in the URL (``http://user:password@host:port/view``);
see ``view.py`` for why the page builds its own request URLs from ``location.origin``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from adapters.broker_security import CredentialsUnavailable, read_secret_file
from gateway.ports import RefusalHook

__all__ = ["BasicAuth", "Handler", "RefusalHook"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_REALM: Final = "derms-gateway operator"
_MAX_HEADER: Final = 4096
"""Longer Authorization headers are refused unread."""


class _Password:
    """Where the password comes from; a file is re-read only when its stamp changes."""

    def __init__(
        self,
        *,
        value: str | None = None,
        file: Path | None = None,
        env: str | None = None,
    ) -> None:
        if sum(x is not None for x in (value, file, env)) != 1:
            raise ValueError("give exactly one of password, password_file or password_env")
        self._value = value
        self._file = file
        self._env = env
        self._stamp: tuple[int, int, int] | None = None
        self._cached: str | None = None

    def current(self) -> str:
        """The password now; :class:`CredentialsUnavailable` when there is none."""
        if self._value is not None:
            return self._value
        if self._env is not None:
            value = os.environ.get(self._env, "")
            if not value:
                raise CredentialsUnavailable("operator.password_env", f"${self._env} is not set")
            return value
        assert self._file is not None
        try:
            st = self._file.stat()
        except OSError as exc:
            raise CredentialsUnavailable(
                "operator.password_file", f"cannot read {self._file}: {exc.strerror}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp or self._cached is None:
            # A few bytes, read once per change of the file: not worth a thread.
            self._cached = read_secret_file(self._file, "operator.password_file")
            self._stamp = stamp
        return self._cached


def _digest(value: str) -> bytes:
    # Equal-length inputs for compare_digest, so the length of a guess leaks nothing either.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class BasicAuth:
    """HTTP Basic authentication for one operator identity.

    Use :meth:`protect` on a handler, or :meth:`middleware` for a whole application."""

    def __init__(
        self,
        user: str,
        *,
        password: str | None = None,
        password_file: Path | None = None,
        password_env: str | None = None,
        realm: str = DEFAULT_REALM,
        on_refused: RefusalHook | None = None,
    ) -> None:
        if not user or ":" in user:
            raise ValueError("the operator user name must be non-empty and hold no ':'")
        if '"' in realm or "\\" in realm:
            raise ValueError("the realm may not hold quotes or backslashes")
        self.user = user
        self.realm = realm
        self.on_refused = on_refused
        """Told of each request with wrong credentials (not of one without any)."""
        self._password = _Password(value=password, file=password_file, env=password_env)
        self._unavailable_logged = False

    def __repr__(self) -> str:
        return f"BasicAuth(user={self.user!r}, realm={self.realm!r})"

    # ------------------------------------------------------------------ checking
    def verify(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries this identity."""
        if header is None or len(header) > _MAX_HEADER:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, colon, given = decoded.partition(":")
        if not colon:
            return False
        try:
            expected = self._password.current()
        except CredentialsUnavailable as exc:
            if not self._unavailable_logged:
                log.error("operator view: no password (%s): every request is refused", exc)
                self._unavailable_logged = True
            return False
        self._unavailable_logged = False
        # Both compared every time: '&' rather than 'and' so a wrong user costs the same.
        user_ok = hmac.compare_digest(_digest(user), _digest(self.user))
        password_ok = hmac.compare_digest(_digest(given), _digest(expected))
        return user_ok & password_ok

    def challenge(self) -> web.Response:
        return web.Response(
            status=401,
            text="401: authentication required\n",
            headers={
                "WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"',
                "Cache-Control": "no-store",
            },
        )

    def allowed(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        if self.verify(header):
            return True
        if header is not None and self.on_refused is not None:
            peer = request.remote or "unknown"
            self.on_refused(f"http:{peer}", "bad_credentials", f"{request.method} {request.path}")
        return False

    # ------------------------------------------------------------------ wiring
    def protect(self, handler: Handler) -> Handler:
        """``handler`` behind this authentication."""

        async def protected(request: web.Request) -> web.StreamResponse:
            if not self.allowed(request):
                return self.challenge()
            return await handler(request)

        protected.__name__ = getattr(handler, "__name__", "protected")
        protected.__doc__ = handler.__doc__
        return protected

    def middleware(self, *, exempt: Iterable[str] = ()) -> Middleware:
        """A middleware that protects every path but those in ``exempt`` (e.g. ``/health``)."""
        open_paths = frozenset(exempt)

        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in open_paths or self.allowed(request):
                return await handler(request)
            return self.challenge()

        return authenticate
