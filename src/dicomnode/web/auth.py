"""Console credentials, sessions, CSRF tokens and the failed-login limiter.

Passwords are stored only as salted scrypt hashes (``hashlib.scrypt``, n=2^14,
r=8, p=1, 16-byte salt) in a credentials file of ``user:scrypt$n$r$p$salt$hash``
lines written by ``dicomnode web-passwd``. No I/O beyond that file; the clock is
passed in where decisions depend on it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

_N: Final = 2**14
_R: Final = 8
_P: Final = 1
_USER: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
#: Failed logins from one address within :data:`LOCK_WINDOW_S` before it is locked out.
MAX_FAILURES: Final = 5
LOCK_WINDOW_S: Final = 900.0


def is_valid_user(name: str) -> bool:
    """Return True for 1-64 characters of letters, digits, ``_ . @ -``."""
    return bool(_USER.match(name))


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Return ``scrypt$n$r$p$salt$hash`` (base64) for ``password``."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Return True when ``password`` matches the ``stored`` hash (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(base64.b64decode(digest)),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def read_credentials(path: Path) -> dict[str, str]:
    """Return ``user -> hash`` from the credentials file (empty when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        user, hashed = line.split(":", 1)
        if is_valid_user(user) and hashed.startswith("scrypt$"):
            users[user] = hashed
    return users


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace ``user`` in the credentials file (atomic write, mode 0600).

    Raises
    ------
    ValueError
        When the user name is invalid or the password is shorter than 8 characters.
    OSError
        When the file cannot be written.
    """
    if not is_valid_user(user):
        raise ValueError("user names are 1-64 letters, digits, _ . @ -")
    if len(password) < 8:
        raise ValueError("the password needs at least 8 characters")
    users = read_credentials(path)
    users[user] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = "# dicomnode console users (written by dicomnode web-passwd)\n" + "".join(
        f"{u}:{h}\n" for u, h in sorted(users.items())
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@dataclass(slots=True)
class Session:
    """One browser session: who, its CSRF token, when it was last used."""

    user: str
    csrf: str
    last_seen: float


@dataclass(slots=True)
class Sessions:
    """Sessions by random token; expire after ``timeout_s`` idle seconds."""

    timeout_s: float
    _by_token: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: str, now: float) -> tuple[str, Session]:
        """Start a session for ``user``; return its token and the session."""
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(24), now)
        with self._lock:
            if len(self._by_token) > 10_000:
                self._by_token.clear()
            self._by_token[token] = session
        return token, session

    def get(self, token: str | None, now: float) -> Session | None:
        """Return the live session of ``token`` (touching it), or None."""
        if not token:
            return None
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            if now - session.last_seen > self.timeout_s:
                del self._by_token[token]
                return None
            session.last_seen = now
            return session

    def end(self, token: str | None) -> None:
        """Forget the session of ``token``."""
        if token:
            with self._lock:
                self._by_token.pop(token, None)


@dataclass(slots=True)
class LoginLimiter:
    """Lock an address out after :data:`MAX_FAILURES` failed logins within the window."""

    _failures: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def is_locked(self, client: str, now: float) -> bool:
        """Return True while ``client`` may not try again."""
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < LOCK_WINDOW_S]
            self._failures[client] = recent
            return len(recent) >= MAX_FAILURES

    def failed(self, client: str, now: float) -> int:
        """Record a failure; return how many are recent."""
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < LOCK_WINDOW_S]
            recent.append(now)
            self._failures[client] = recent
            return len(recent)

    def succeeded(self, client: str) -> None:
        """Forget the failures of ``client``."""
        with self._lock:
            self._failures.pop(client, None)
