"""The console's HTTP server: routing, login, CSRF, pages, actions, /metrics, /healthz.

One :class:`http.server.ThreadingHTTPServer` (a thread per request) in the
node's main process; pages are Jinja2 templates rendered on the server, with a
few lines of JavaScript for live refresh. Every page query is bounded. Actions
(Retry, Delete, logout) are POST requests that carry the session's CSRF token.
On an address other than loopback the console does not start without
credentials; with credentials every page but ``/metrics`` and ``/healthz``
needs a login. Failed logins are rate-limited per client address and logged;
the access log (logger ``dicomnode.web.access``) records who did what.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import http.server
import ipaddress
import logging
import os
import shutil
import socket
import sqlite3
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Final

import jinja2

from dicomnode import config as cfgmod
from dicomnode.config import NodeConfig
from dicomnode.errors import ConfigError
from dicomnode.forwarder.batching import FAILED_DIR_NAME, group_entries, group_label
from dicomnode.forwarder.outcome import ERROR_LOG_NAME, move_back_file, remove_empty_parents
from dicomnode.forwarder.watcher import has_pending_conversion, scan_folder
from dicomnode.ledger import queries
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.ledger.schema import LedgerUnavailable, open_reader
from dicomnode.ledger.tally import Labels
from dicomnode.web import auth
from dicomnode.web.health import Facts, assess
from dicomnode.web.logbuffer import RecentLines
from dicomnode.web.metrics import Gauges, NodeCollector, exposition

logger = logging.getLogger(__name__)
access = logging.getLogger("dicomnode.web.access")

_COOKIE: Final = "dicomnode_session"
_SECRET_KEYS: Final = ("private_key", "password", "secret", "credentials")
_MAX_BODY: Final = 64 * 1024
_PARKED_LIMIT: Final = 500


def is_loopback(address: str) -> bool:
    """Return True for a loopback IP or ``localhost``."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class NodeProbe:
    """How the console sees the running node (all optional: a part may not run).

    Attributes
    ----------
    receiver_listening : callable or None
        Returns True while the receiver serves; None when the receiver is off.
    active_associations : callable or None
        Returns the number of associations served now.
    forwarder_status : callable or None
        Returns :meth:`dicomnode.forwarder.Forwarder.status`; None when the forwarder is off.
    counters : callable or None
        Returns the ledger writer's counters; None when the ledger is off.
    ledger_available : callable or None
        Returns True while the ledger can be written.
    """

    receiver_listening: Callable[[], bool] | None = None
    active_associations: Callable[[], int] | None = None
    forwarder_status: Callable[[], dict[str, Any]] | None = None
    counters: Callable[[], dict[tuple[str, Labels], float]] | None = None
    ledger_available: Callable[[], bool] | None = None


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def disk_free(paths: Iterable[Path]) -> dict[str, int]:
    """Return free bytes of each path's volume (the nearest existing parent), by path."""
    out: dict[str, int] = {}
    for path in paths:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            out[str(path)] = shutil.disk_usage(probe).free
    return out


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    client: str
    session: auth.Session | None
    token: str | None
    set_cookie: list[str] = field(default_factory=list)


class _Response(Exception):
    """Raised inside a route to answer at once (redirects, errors)."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


class Console:
    """The operator console of one node.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration ([Web], folders, ledger location).
    probe : NodeProbe
        Live views of the running node.
    recent : RecentLines, optional
        The handler keeping recent log lines (the Log page).

    Raises
    ------
    ConfigError
        When the console would listen on a non-loopback address without
        credentials, or HTTPS material cannot be loaded.
    """

    def __init__(
        self, config: NodeConfig, probe: NodeProbe, recent: RecentLines | None = None
    ) -> None:
        self.config = config
        self.web = config.web
        self.probe = probe
        self.recent = recent or RecentLines()
        self.users = auth.read_credentials(config.web_credentials)
        if not self.users and not is_loopback(self.web.address):
            raise ConfigError(
                f"[Web] address = {self.web.address} is not loopback and no console credentials "
                f"exist in {config.web_credentials}: create them with `dicomnode web-passwd USER` "
                "or bind the console to 127.0.0.1"
            )
        self.sessions = auth.Sessions(self.web.session_timeout_s)
        self.limiter = auth.LoginLimiter()
        self.ssl_context: ssl.SSLContext | None = None
        if self.web.https:
            try:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(str(self.web.certificate), str(self.web.private_key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[Web] https: cannot load certificate/key: {exc}") from None
            self.ssl_context = ctx
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("dicomnode.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["time"] = _fmt_time
        self.env.filters["bytes"] = _fmt_bytes
        self.env.filters["folder"] = lambda p: os.path.dirname(p) if p else ""
        self.collector = NodeCollector(self._counters, self._gauges)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def requires_login(self) -> bool:
        """True when credentials exist (then every page but /metrics and /healthz needs a login)."""
        return bool(self.users)

    @property
    def url(self) -> str:
        """Return the console's base URL."""
        scheme = "https" if self.ssl_context else "http"
        host = self.web.address if ":" not in self.web.address else f"[{self.web.address}]"
        port = self._server.server_address[1] if self._server else self.web.port
        return f"{scheme}://{host}:{port}/"

    def start(self) -> None:
        """Bind and serve in a background thread.

        Raises
        ------
        OSError
            When the address cannot be bound.
        """
        console = self

        class Handler(_Handler):
            pass

        Handler.console = console
        server_cls = http.server.ThreadingHTTPServer
        if ":" in self.web.address:

            class V6(http.server.ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_cls = V6
        server = server_cls((self.web.address, self.web.port), Handler)
        server.daemon_threads = True
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="dicomnode-web",
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "CONSOLE listening on %s (login %s)",
            self.url,
            "required" if self.users else "not required: loopback",
        )

    def stop(self) -> None:
        """Stop serving."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    # -- facts -------------------------------------------------------------------------

    def _counters(self) -> dict[tuple[str, Labels], float]:
        if self.probe.counters is not None:
            return self.probe.counters()
        return {}

    def _data_folders(self) -> list[Path]:
        folders = []
        if self.probe.receiver_listening is not None:
            folders.append(self.config.receiver.destination_dir)
        if self.probe.forwarder_status is not None:
            folders.append(self.config.forwarder.watch_folder)
        return folders

    def _parked_files(self, limit: int = 100_000) -> list[Path]:
        failed = self.config.forwarder.watch_folder / FAILED_DIR_NAME
        found: list[Path] = []
        if not failed.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(failed):
            dirnames.sort()
            for name in sorted(filenames):
                if dirpath == str(failed) and name == ERROR_LOG_NAME:
                    continue
                if name.startswith("."):
                    continue
                found.append(Path(dirpath) / name)
                if len(found) >= limit:
                    return found
        return found

    def _gauges(self) -> Gauges:
        pending = 0
        if self.probe.forwarder_status is not None:
            with contextlib.suppress(OSError):
                pending = len(scan_folder(self.config.forwarder.watch_folder))
        active = self.probe.active_associations() if self.probe.active_associations else 0
        return Gauges(
            forward_pending_files=pending,
            parked_files=len(self._parked_files()),
            disk_free_bytes=disk_free(self._data_folders()),
            active_associations=active,
            ledger_available=bool(self.probe.ledger_available and self.probe.ledger_available()),
        )

    def health(self) -> list[str]:
        """Return why the node is unhealthy (empty when healthy)."""
        status = self.probe.forwarder_status() if self.probe.forwarder_status else None
        failing: dict[str, tuple[float, str]] = {}
        now = time.time()
        if status is not None:
            for key, state in status["retry"].items():
                failing[key] = (now - state.first_failure, state.last_error)
        facts = Facts(
            receiver_listening=self.probe.receiver_listening()
            if self.probe.receiver_listening
            else None,
            disk_free_bytes=disk_free(self._data_folders()),
            guard_bytes=self.config.receiver.min_free_space_mb * 1_000_000,
            forwarder_running=bool(status["running"]) if status is not None else None,
            failing_groups=failing,
            stuck_after_s=2 * self.config.forwarder.retry_max_delay_s,
        )
        return assess(facts)

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[sqlite3.Connection | None]:
        try:
            conn = open_reader(self.config.ledger_path)
        except LedgerUnavailable:
            yield None
            return
        try:
            yield conn
        finally:
            conn.close()

    # -- routing -----------------------------------------------------------------------

    def handle(self, req: _Request) -> tuple[int, str, bytes]:
        """Answer one request: (status, content type, body)."""
        if req.path == "/metrics" and req.method == "GET":
            return 200, "text/plain; version=0.0.4; charset=utf-8", exposition(self.collector)
        if req.path == "/healthz" and req.method == "GET":
            reasons = self.health()
            body = ("ok\n" if not reasons else "unhealthy: " + "; ".join(reasons) + "\n").encode()
            return (200 if not reasons else 503), "text/plain; charset=utf-8", body
        if req.path == "/login":
            return self._login(req)
        if req.session is None:
            if self.requires_login:
                raise _Response(303, headers={"Location": "/login"})
            token, session = self.sessions.create("local", time.time())
            req.session, req.token = session, token
            req.set_cookie.append(self._cookie(token))
        if req.method == "POST":
            if not hmac.compare_digest(req.form.get("csrf", ""), req.session.csrf):
                access.warning(
                    "WEB-CSRF-REJECTED user=%s client=%s %s", req.session.user, req.client, req.path
                )
                raise _Response(403, b"missing or wrong CSRF token\n")
            if req.path == "/logout":
                self.sessions.end(req.token)
                access.info("WEB-LOGOUT user=%s client=%s", req.session.user, req.client)
                raise _Response(303, headers={"Location": "/login" if self.requires_login else "/"})
            if req.path == "/failed/retry":
                return self._retry(req)
            if req.path == "/failed/delete":
                return self._delete(req)
            raise _Response(404, b"not found\n")
        pages: dict[str, Callable[[_Request], tuple[str, dict[str, Any]]]] = {
            "/": self._dashboard,
            "/studies": self._studies,
            "/study": self._study,
            "/queue": self._queue,
            "/failed": self._failed,
            "/log": self._log,
            "/config": self._config,
        }
        page = pages.get(req.path)
        if page is None or req.method != "GET":
            raise _Response(404, b"not found\n")
        template, context = page(req)
        return 200, "text/html; charset=utf-8", self._render(template, req, context)

    def _render(self, template: str, req: _Request, context: dict[str, Any]) -> bytes:
        base = {
            "user": req.session.user if req.session else "",
            "csrf": req.session.csrf if req.session else "",
            "requires_login": self.requires_login,
            "path": req.path,
            "node": self.config.receiver.ae_title,
            "now": time.time(),
            "flash": req.query.get("msg", ""),
        }
        base.update(context)
        return self.env.get_template(template).render(**base).encode("utf-8")

    def _cookie(self, token: str, expire: bool = False) -> str:
        parts = [f"{_COOKIE}={token}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if self.ssl_context is not None:
            parts.append("Secure")
        if expire:
            parts.append("Max-Age=0")
        return "; ".join(parts)

    # -- login ---------------------------------------------------------------------------

    def _login(self, req: _Request) -> tuple[int, str, bytes]:
        if req.method == "GET":
            return 200, "text/html; charset=utf-8", self._render("login.html", req, {"error": ""})
        now = time.time()
        user = req.form.get("user", "")
        if self.limiter.is_locked(req.client, now):
            access.warning("WEB-LOGIN-LOCKED client=%s (too many failed logins)", req.client)
            body = self._render(
                "login.html", req, {"error": "Too many failed logins: try again in 15 minutes."}
            )
            return 429, "text/html; charset=utf-8", body
        stored = self.users.get(user)
        if stored is None or not auth.verify_password(req.form.get("password", ""), stored):
            failures = self.limiter.failed(req.client, now)
            shown = user if auth.is_valid_user(user) else "(invalid)"
            access.warning(
                "WEB-LOGIN-FAILED user=%s client=%s failures=%d",
                shown,
                req.client,
                failures,
                extra=ledger_extra(
                    EventKind.CONSOLE, actor=shown, peer=req.client, status="login-failed"
                ),
            )
            body = self._render("login.html", req, {"error": "Wrong user name or password."})
            return 401, "text/html; charset=utf-8", body
        self.limiter.succeeded(req.client)
        token, _ = self.sessions.create(user, now)
        access.info(
            "WEB-LOGIN user=%s client=%s",
            user,
            req.client,
            extra=ledger_extra(EventKind.CONSOLE, actor=user, peer=req.client, status="login"),
        )
        raise _Response(303, headers={"Location": "/", "Set-Cookie": self._cookie(token)})

    # -- pages ---------------------------------------------------------------------------

    def _dashboard(self, req: _Request) -> tuple[str, dict[str, Any]]:
        now = time.time()
        midnight = time.mktime((*time.localtime(now)[:3], 0, 0, 0, 0, 0, -1))
        today = week = None
        with self._ledger() as conn:
            if conn is not None:
                today = queries.summary(conn, midnight)
                week = queries.summary(conn, now - 7 * 86400)
        status = self.probe.forwarder_status() if self.probe.forwarder_status else None
        backoff = 0.0
        if status is not None:
            backoff = max((s.next_attempt - now for s in status["retry"].values()), default=0.0)
        gauges = self._gauges()
        return "dashboard.html", {
            "today": today,
            "week": week,
            "health": self.health(),
            "gauges": gauges,
            "guard_bytes": self.config.receiver.min_free_space_mb * 1_000_000,
            "forwarder": status,
            "backoff": max(0.0, backoff),
            "target": f"{self.config.forwarder.target_aet}@{self.config.forwarder.target_ip}:"
            f"{self.config.forwarder.target_port}",
        }

    def _studies(self, req: _Request) -> tuple[str, dict[str, Any]]:
        q = req.query
        rows: list[sqlite3.Row] = []
        with self._ledger() as conn:
            if conn is not None:
                rows = queries.search_studies(
                    conn,
                    q.get("patient", "").strip(),
                    q.get("date", "").strip(),
                    q.get("ae", "").strip(),
                    100,
                )
        return "studies.html", {"rows": rows, "q": q}

    def _study(self, req: _Request) -> tuple[str, dict[str, Any]]:
        uid = req.query.get("uid", "")
        with self._ledger() as conn:
            if conn is None:
                raise _Response(404, b"no ledger\n")
            study = queries.study(conn, uid)
            if study is None:
                raise _Response(404, b"unknown study\n")
            series = queries.study_series(conn, uid)
            deliveries = queries.study_deliveries(conn, uid)
        return "study.html", {"study": study, "series": series, "deliveries": deliveries}

    def _queue(self, req: _Request) -> tuple[str, dict[str, Any]]:
        status = self.probe.forwarder_status() if self.probe.forwarder_status else None
        groups: list[dict[str, Any]] = []
        watch = self.config.forwarder.watch_folder
        now = time.time()
        fw = self.config.forwarder
        if status is not None:
            for key, snap in sorted(group_entries(scan_folder(watch)).items())[:500]:
                newest = max((f.mtime_ns for f in snap.files), default=0) / 1e9
                retry = status["retry"].get(key)
                if key in status["sending"]:
                    why = "sending now"
                elif key in status.get("waiting", {}):
                    why = f"waiting for RT references: {status['waiting'][key]}"
                elif retry is not None and retry.next_attempt > now:
                    why = f"backing off after a network failure (attempt {retry.attempts})"
                elif has_pending_conversion(watch, key):
                    why = "waiting for an Enhanced MR conversion"
                elif now - newest < fw.inactivity_timeout:
                    why = f"waiting for {fw.inactivity_timeout:g} s of quiet"
                else:
                    why = "ready: next scheduler pass"
                groups.append(
                    {
                        "label": group_label(key),
                        "files": len(snap.files),
                        "bytes": sum(f.size for f in snap.files),
                        "changed": newest,
                        "why": why,
                        "next_retry": retry.next_attempt if retry else None,
                        "last_error": retry.last_error if retry else "",
                    }
                )
        return "queue.html", {"groups": groups, "forwarder": status, "target": fw}

    def _failed(self, req: _Request) -> tuple[str, dict[str, Any]]:
        files = self._parked_files(_PARKED_LIMIT)
        failed = self.config.forwarder.watch_folder / FAILED_DIR_NAME
        reasons: dict[str, sqlite3.Row] = {}
        retries: list[dict[str, Any]] = []
        with self._ledger() as conn:
            if conn is not None:
                reasons = queries.parked_reasons(conn, [str(p) for p in files])
                retries = queries.recent_retries(conn, 20)
        watch = str(self.config.forwarder.watch_folder) + os.sep
        for r in retries:
            moved = str(r.get("path") or "")
            r["shown"] = moved[len(watch) :] if moved.startswith(watch) else moved
        items = []
        for path in files:
            row = reasons.get(str(path))
            with contextlib.suppress(OSError):
                items.append(
                    {
                        "path": str(path),
                        "name": path.relative_to(failed).as_posix(),
                        "size": path.stat().st_size,
                        "reason": row["reason"] if row is not None else "(not in the ledger)",
                        "sop_uid": row["sop_uid"] if row is not None else "",
                        "patient_id": row["patient_id"] if row is not None else "",
                        "parked": row["ts"] if row is not None else path.stat().st_mtime,
                    }
                )
        return "failed.html", {"items": items, "retries": retries, "limit": _PARKED_LIMIT}

    def _log(self, req: _Request) -> tuple[str, dict[str, Any]]:
        verb = req.query.get("verb", "")
        return "log.html", {
            "lines": self.recent.lines(verb, 500),
            "verbs": self.recent.verbs(),
            "verb": verb,
        }

    def _config(self, req: _Request) -> tuple[str, dict[str, Any]]:
        lines = []
        for line in cfgmod.describe(self.config):
            key = line.split("=", 1)[0].strip().lower()
            if "=" in line and any(s in key for s in _SECRET_KEYS):
                value = line.split("=", 1)[1].strip()
                line = f"{line.split('=', 1)[0]}= {'(hidden)' if value else ''}"
            lines.append(line)
        return "config.html", {"lines": lines}

    # -- actions -------------------------------------------------------------------------

    def _parked_arg(self, req: _Request) -> Path:
        failed = (self.config.forwarder.watch_folder / FAILED_DIR_NAME).resolve()
        raw = req.form.get("path", "")
        path = Path(raw)
        try:
            resolved = path.resolve()
        except OSError:
            raise _Response(400, b"bad path\n") from None
        if (
            failed not in resolved.parents
            or not resolved.is_file()
            or resolved.name == ERROR_LOG_NAME
        ):
            raise _Response(400, b"not a parked file\n")
        return path

    def _retry(self, req: _Request) -> tuple[int, str, bytes]:
        assert req.session is not None
        path = self._parked_arg(req)
        try:
            dest = move_back_file(self.config.forwarder.watch_folder, path, actor=req.session.user)
        except FileExistsError as exc:
            msg = f"Not moved: {exc.filename} already exists"
        except (OSError, ValueError) as exc:
            msg = f"Not moved: {exc}"
        else:
            msg = f"Moved back for sending: {dest.relative_to(self.config.forwarder.watch_folder)}"
        access.info(
            "WEB-RETRY user=%s client=%s file=%s result=%s", req.session.user, req.client, path, msg
        )
        raise _Response(
            303, headers={"Location": "/failed?" + urllib.parse.urlencode({"msg": msg})}
        )

    def _delete(self, req: _Request) -> tuple[int, str, bytes]:
        assert req.session is not None
        path = self._parked_arg(req)
        try:
            path.unlink()
        except OSError as exc:
            msg = f"Not deleted: {exc.strerror or exc}"
        else:
            remove_empty_parents(path, self.config.forwarder.watch_folder / FAILED_DIR_NAME)
            msg = f"Deleted {path.name}"
            logger.warning(
                "DELETED parked file %s by console user %s",
                path,
                req.session.user,
                extra=ledger_extra(EventKind.DELETED, path=str(path), actor=req.session.user),
            )
        access.info(
            "WEB-DELETE user=%s client=%s file=%s result=%s",
            req.session.user,
            req.client,
            path,
            msg,
        )
        raise _Response(
            303, headers={"Location": "/failed?" + urllib.parse.urlencode({"msg": msg})}
        )


class _Handler(http.server.BaseHTTPRequestHandler):
    console: Console
    server_version = "dicomnode"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are logged by :meth:`_serve` (access logger), not on stderr."""

    def do_GET(self) -> None:
        """Serve a GET request."""
        self._serve("GET")

    def do_POST(self) -> None:
        """Serve a POST request."""
        self._serve("POST")

    def _serve(self, method: str) -> None:
        console = self.console
        parsed = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        form: dict[str, str] = {}
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._answer(413, "text/plain", b"too large\n", {})
                return
            body = self.rfile.read(length).decode("utf-8", "replace")
            form = {k: v[-1] for k, v in urllib.parse.parse_qs(body).items()}
        cookie = SimpleCookie()
        with contextlib.suppress(Exception):
            cookie.load(self.headers.get("Cookie") or "")
        token = cookie[_COOKIE].value if _COOKIE in cookie else None
        session = console.sessions.get(token, time.time())
        req = _Request(method, parsed.path, query, form, self.client_address[0], session, token)
        headers: dict[str, str] = {}
        try:
            status, ctype, body_bytes = console.handle(req)
        except _Response as resp:
            status, ctype, body_bytes = resp.status, "text/plain; charset=utf-8", resp.body
            headers.update(resp.headers)
        except Exception:
            logger.exception("WEB-ERROR %s %s", method, parsed.path)
            status, ctype, body_bytes = 500, "text/plain; charset=utf-8", b"internal error\n"
        if req.set_cookie and "Set-Cookie" not in headers:
            headers["Set-Cookie"] = req.set_cookie[0]
        user = req.session.user if req.session else "-"
        level = logging.INFO if method == "POST" else logging.DEBUG
        access.log(
            level,
            "WEB user=%s client=%s %s %s -> %d",
            user,
            req.client,
            method,
            html.escape(parsed.path),
            status,
        )
        self._answer(status, ctype, body_bytes, headers)

    def _answer(self, status: int, ctype: str, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(
            status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        )
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
        )
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
