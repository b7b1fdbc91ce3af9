"""Read and validate the INI configuration into frozen dataclasses.

:func:`load` is the only reader of configuration files. It accepts the original
tool's ``config.ini`` unchanged (inline ``# comments``, Windows paths, mixed-case
AE titles) and rejects anything it does not understand with a
:class:`~dicomnode.errors.ConfigError` that names file, section, key and the
accepted values. Imports only the standard library and :mod:`dicomnode.errors`.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Final, TypeVar

from dicomnode.errors import ConfigError

T = TypeVar("T")

#: Where the node keeps its data when no configuration file exists.
DEFAULT_DATA_DIR: Final = "dicomnode-data"

#: The configuration used when neither ``--config`` nor ``./config.ini`` exists.
#: It binds to loopback only, which is the sole reason it may trust any AE title.
EMBEDDED_DEFAULT: Final = f"""
[General]
ae_title = DICOMNODE
window_title = dicomnode
[Network]
receive_port = 11112
server_ip = 127.0.0.1
[Directories]
destination_dir = {DEFAULT_DATA_DIR}/received
[Security]
trusted_ae_titles = *
[Tools]
enhanced_mr_conversion = native
[FolderWatcher]
watch_folder = {DEFAULT_DATA_DIR}/outgoing
target_aet =
target_ip =
target_port = 104
[Logging]
verbose = false
[Web]
enabled = true
address = 127.0.0.1
port = 8080
"""

#: Default clinical send order: images, other objects, then RT objects.
DEFAULT_SEND_ORDER: Final = ("IMAGES", "OTHER", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD")
_SEND_ORDER_TOKENS: Final = frozenset(DEFAULT_SEND_ORDER)

#: Fields of the folder layout template (see README "Folder layout").
LAYOUT_FIELDS: Final = frozenset(
    {"patient", "study", "series", "modality", "patient_id", "study_date", "series_number"}
)
DEFAULT_LAYOUT: Final = "{patient}/{study}/{series}"

_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off", ""}


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """Settings of the C-STORE/C-ECHO SCP.

    Attributes
    ----------
    ae_title : str
        Our AE title ([General] ae_title, default ``DICOMNODE``).
    server_ip : str
        Address to bind ([Network] server_ip, default ``127.0.0.1``).
    receive_port : int
        TCP port ([Network] receive_port, default 11112).
    destination_dir : Path
        Root of received objects ([Directories] destination_dir).
    trusted_ae_titles : tuple of str
        Calling AE titles allowed to associate; ``*`` means any.
    require_called_aet : bool
        Reject associations addressed to another AE title (default False).
    ae_mappings : tuple of (str, Path)
        Calling AE title to folder; relative folders are below destination_dir.
    ae_hosts : tuple of (str, tuple of str)
        Calling AE title to the host names/addresses it may connect from.
    folder_layout : str
        Template of the folder below the AE folder (default ``{patient}/{study}/{series}``).
    max_pdu_bytes : int
        Maximum PDU size we accept (default 1 MiB; 0 means unlimited).
    max_associations : int
        Concurrent associations served (default 16).
    acse_timeout_s, dimse_timeout_s, network_timeout_s : float
        Association, message and idle-network timeouts in seconds (30, 60, 120).
    max_object_mb : int
        Largest object accepted in MB; 0 means no limit (default 0).
    receiver_transport : str
        ``lean`` (default: dicomnode's own C-STORE/C-ECHO SCP) or ``pynetdicom``.
    receiver_processes : int
        Processes sharing the listening socket; 0 means automatic (one per CPU,
        at most 4, on POSIX; 1 on Windows). Default 0 (``auto``).
    min_free_space_mb : int
        Refuse stores (0xA700) while the destination, or the AE folder an object goes
        to (e.g. a mapped watch folder on another volume), has less free space (default 100).
    """

    ae_title: str = "DICOMNODE"
    server_ip: str = "127.0.0.1"
    receive_port: int = 11112
    destination_dir: Path = Path(DEFAULT_DATA_DIR) / "received"
    trusted_ae_titles: tuple[str, ...] = ("*",)
    require_called_aet: bool = False
    ae_mappings: tuple[tuple[str, Path], ...] = ()
    ae_hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    folder_layout: str = DEFAULT_LAYOUT
    max_pdu_bytes: int = 1048576
    max_associations: int = 16
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    max_object_mb: int = 0
    min_free_space_mb: int = 100
    receiver_processes: int = 0
    receiver_transport: str = "lean"

    @property
    def trusts_any_ae(self) -> bool:
        """Return True when ``*`` is in the trusted list."""
        return "*" in self.trusted_ae_titles

    @property
    def errors_dir(self) -> Path:
        """Return the folder where objects that could not be stored are kept."""
        return self.destination_dir / "errors"


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    """Settings of the folder watcher that forwards to one target node.

    Attributes
    ----------
    watch_folder : Path
        Folder whose top-level subfolders are sent as groups.
    target_aet, target_ip : str
        Target node; an empty target_ip disables the forwarder.
    target_port : int
        Target TCP port (default 104).
    calling_aet : str
        AE title we present when sending (default: [General] ae_title).
    max_workers : int
        Groups sent in parallel (default 4).
    heartbeat_interval : float
        Seconds between heartbeat log lines (default 120).
    process_timer_interval : float
        Seconds between full rescans of the watch folder (default 10).
    inactivity_timeout : float
        Seconds a group must be quiet before it is sent (default 5).
    use_polling : bool
        Do not rely on file-system events, only rescans (network shares).
    send_order : tuple of str
        Order of object classes inside a group.
    retry_initial_delay_s, retry_max_delay_s, give_up_after_s : float
        Exponential backoff after network failures (30 s doubling to 600 s);
        after give_up_after_s (86400 s) the files are parked in failed/.
    acse_timeout_s, dimse_timeout_s, network_timeout_s : float
        Timeouts of the sending association (30, 60, 120 s).
    max_pdu_bytes : int
        Maximum PDU size we accept on the sending association (default 1 MiB).
    transport : str
        ``lean`` (dicomnode's own streaming C-STORE SCU) or ``pynetdicom``.
    """

    watch_folder: Path = Path(DEFAULT_DATA_DIR) / "outgoing"
    target_aet: str = ""
    target_ip: str = ""
    target_port: int = 104
    calling_aet: str = "DICOMNODE"
    max_workers: int = 4
    heartbeat_interval: float = 120.0
    process_timer_interval: float = 10.0
    inactivity_timeout: float = 5.0
    use_polling: bool = False
    send_order: tuple[str, ...] = DEFAULT_SEND_ORDER
    retry_initial_delay_s: float = 30.0
    retry_max_delay_s: float = 600.0
    give_up_after_s: float = 86400.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    max_pdu_bytes: int = 1048576
    transport: str = "lean"

    @property
    def has_target(self) -> bool:
        """Return True when a target node is configured."""
        return bool(self.target_ip and self.target_aet)

    @property
    def failed_dir(self) -> Path:
        """Return the folder where undeliverable files are parked."""
        return self.watch_folder / "failed"


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    """Enhanced multi-frame conversion settings ([Tools]).

    Attributes
    ----------
    emf2sf_path : Path or None
        dcm4che ``bin`` folder or the emf2sf executable itself.
    enhanced_mr_conversion : str
        ``native``, ``emf2sf`` or ``off``.
    keep_enhanced_original : bool
        Keep the received enhanced object in its series folder (default True).
    emf2sf_timeout_s : float
        Time limit of one emf2sf run (default 300 s).
    """

    emf2sf_path: Path | None = None
    enhanced_mr_conversion: str = "off"
    keep_enhanced_original: bool = True
    emf2sf_timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """DICOM TLS settings ([TLS]); disabled unless ``enabled = true``."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_bundle: Path | None = None
    require_client_cert: bool = True
    min_version: str = "1.2"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Logging settings ([Logging]).

    Attributes
    ----------
    verbose : bool
        DEBUG level for dicomnode when True, INFO otherwise.
    log_file : Path or None
        Optional rotating log file.
    log_max_mb : int
        Size at which the log file rotates (default 10).
    log_backup_count : int
        Rotated files kept (default 10).
    pynetdicom_level : str
        Level of the ``pynetdicom`` logger (default WARNING).
    """

    verbose: bool = False
    log_file: Path | None = None
    log_max_mb: int = 10
    log_backup_count: int = 10
    pynetdicom_level: str = "WARNING"


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """The event ledger ([Ledger]).

    Attributes
    ----------
    enabled : bool
        Record events in the SQLite ledger (default True).
    location : Path or None
        The ledger file; None means ``<destination_dir>/.ledger/ledger.sqlite``.
    retention_days : int
        Events older than this many days are deleted; 0 keeps them forever (default 365).
    """

    enabled: bool = True
    location: Path | None = None
    retention_days: int = 365


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The operator console, /metrics and /healthz ([Web]).

    Attributes
    ----------
    enabled : bool
        Serve the console (default False in files; the embedded default turns it on).
    address : str
        Address to bind (default ``127.0.0.1``); any other than loopback needs credentials.
    port : int
        TCP port (default 8080).
    credentials_file : Path or None
        Users and salted password hashes written by ``dicomnode web-passwd``;
        None means ``web-users`` beside the ledger.
    https : bool
        Serve HTTPS (default False).
    certificate, private_key : Path or None
        PEM certificate and key for HTTPS; empty reuses [TLS] certificate/private_key.
    session_timeout_s : float
        A login expires after this many idle seconds (default 3600).
    """

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 8080
    credentials_file: Path | None = None
    https: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    session_timeout_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The whole validated configuration of one node."""

    source: str = "embedded default"
    window_title: str = "dicomnode"
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    web: WebConfig = field(default_factory=WebConfig)

    @property
    def ledger_path(self) -> Path:
        """Return the ledger file ([Ledger] location or ``<destination_dir>/.ledger/ledger.sqlite``)."""
        if self.ledger.location is not None:
            return self.ledger.location
        return self.receiver.destination_dir / ".ledger" / "ledger.sqlite"

    @property
    def web_credentials(self) -> Path:
        """Return the console's credentials file ([Web] credentials_file or beside the ledger)."""
        if self.web.credentials_file is not None:
            return self.web.credentials_file
        return self.ledger_path.parent / "web-users"

    def with_watch_folder(self, path: Path) -> NodeConfig:
        """Return a copy whose forwarder watches ``path`` (``--watch-folder``)."""
        return replace(self, forwarder=replace(self.forwarder, watch_folder=path))


# --------------------------------------------------------------------------- parsing


class _Section:
    """Typed, validated access to one INI section; records which keys were read."""

    def __init__(self, source: str, name: str, items: Mapping[str, str]) -> None:
        self.source = source
        self.name = name
        self.items = {k.lower(): v.strip() for k, v in items.items()}
        self.used: set[str] = set()

    def error(self, key: str, value: str, accepted: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: [{self.name}] {key} = {value!r} is invalid; accepted: {accepted}"
        )

    def raw(self, key: str) -> str | None:
        self.used.add(key)
        return self.items.get(key)

    def get(self, key: str, default: T, convert: Callable[[str], T], accepted: str) -> T:
        value = self.raw(key)
        if value is None or (value == "" and not isinstance(default, str)):
            return default
        try:
            return convert(value)
        except (ValueError, TypeError):
            raise self.error(key, value, accepted) from None

    def text(self, key: str, default: str) -> str:
        value = self.raw(key)
        return default if value is None else value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        def conv(v: str) -> int:
            n = int(v, 10)
            if not lo <= n <= hi:
                raise ValueError(v)
            return n

        return self.get(key, default, conv, f"a whole number from {lo} to {hi}")

    def seconds(self, key: str, default: float, lo: float = 0.0) -> float:
        def conv(v: str) -> float:
            n = float(v)
            if not (n >= lo and n < 1e9):
                raise ValueError(v)
            return n

        return self.get(key, default, conv, f"a number of seconds >= {lo:g}")

    def boolean(self, key: str, default: bool) -> bool:
        def conv(v: str) -> bool:
            low = v.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(v)

        return self.get(key, default, conv, "true or false (also yes/no, on/off, 1/0)")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def conv(v: str) -> str:
            if v.lower() not in choices:
                raise ValueError(v)
            return v.lower()

        return self.get(key, default, conv, " | ".join(choices))

    def check_unknown(self, known: set[str]) -> None:
        for key in self.items:
            if key not in known:
                raise ConfigError(
                    f"{self.source}: [{self.name}] unknown key {key!r}; "
                    f"accepted keys: {', '.join(sorted(known))}"
                )


def validate_ae_title(value: str) -> str:
    """Return ``value`` stripped if it is a valid AE title, else raise ValueError.

    A valid AE title has 1 to 16 characters, is not only spaces and contains no
    backslash or control characters (PS3.5 6.2, VR AE).
    """
    stripped = value.strip()
    if not stripped or len(stripped) > 16 or _AE_FORBIDDEN.search(stripped):
        raise ValueError(value)
    return stripped


_AE_ACCEPTED: Final = "1-16 characters, no backslash or control characters"


def _ae(section: _Section, key: str, default: str, allow_empty: bool = False) -> str:
    value = section.raw(key)
    if value is None:
        return default
    if allow_empty and value == "":
        return ""
    try:
        return validate_ae_title(value)
    except ValueError:
        raise section.error(key, value, _AE_ACCEPTED) from None


def _resolve(base: Path, value: str) -> Path:
    """Turn a configured path into a Path, relative paths against ``base``.

    Windows absolute paths (``D:\\x``, ``\\\\server\\share``) are kept as they are
    on every platform so a Windows ``config.ini`` still loads elsewhere.
    """
    if PureWindowsPath(value).is_absolute() or PurePosixPath(value).is_absolute():
        return Path(value)
    if re.match(r"^[A-Za-z]:", value) or value.startswith("\\\\"):
        return Path(value)
    return base / value


def _path(section: _Section, key: str, default: Path | None, base: Path) -> Path | None:
    value = section.raw(key)
    if value is None:
        return default
    if value == "":
        return None
    if "\x00" in value:
        raise section.error(key, value, "a folder path")
    return _resolve(base, value)


def _host(section: _Section, key: str, default: str, allow_empty: bool) -> str:
    value = section.raw(key)
    if value is None:
        return default
    if value == "" and allow_empty:
        return ""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
        return value
    raise section.error(key, value, "an IP address or host name")


_SECTIONS: Final = (
    "General",
    "Network",
    "Directories",
    "Security",
    "AE_Mappings",
    "AE_Hosts",
    "Tools",
    "FolderWatcher",
    "TLS",
    "Logging",
    "Ledger",
    "Web",
)


def _read_parser(text: str, source: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=("#", ";"),
        comment_prefixes=("#", ";"),
        strict=True,
        empty_lines_in_values=False,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep AE title case
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not a valid INI file: {first}") from None
    by_lower = {s.lower(): s for s in _SECTIONS}
    for name in parser.sections():
        if name.lower() not in by_lower:
            raise ConfigError(
                f"{source}: unknown section [{name}]; accepted sections: {', '.join(_SECTIONS)}"
            )
        if name != by_lower[name.lower()]:
            raise ConfigError(
                f"{source}: section [{name}] must be spelled [{by_lower[name.lower()]}]"
            )
    return parser


def parse(text: str, source: str, base_dir: Path) -> NodeConfig:
    """Parse configuration text into a validated :class:`NodeConfig`.

    Parameters
    ----------
    text : str
        INI text.
    source : str
        Where the text came from, used in error messages and the start-up summary.
    base_dir : Path
        Folder against which relative paths are resolved.

    Returns
    -------
    NodeConfig
        The validated configuration; absent keys take their documented defaults.

    Raises
    ------
    ConfigError
        On an unknown section or key, or a value outside its accepted range.
    """
    parser = _read_parser(text, source)

    def section(name: str) -> _Section:
        items = dict(parser.items(name)) if parser.has_section(name) else {}
        return _Section(source, name, items)

    general = section("General")
    ae_title = _ae(general, "ae_title", "DICOMNODE")
    window_title = general.text("window_title", "dicomnode")
    general.check_unknown({"ae_title", "window_title"})

    net = section("Network")
    network = {
        "server_ip": _host(net, "server_ip", "127.0.0.1", allow_empty=False),
        "receive_port": net.integer("receive_port", 11112, 1, 65535),
        "max_pdu_bytes": net.integer("max_pdu_bytes", 1048576, 0, 2**32 - 1),
        "max_associations": net.integer("max_associations", 16, 1, 1000),
        "acse_timeout_s": net.seconds("acse_timeout_s", 30.0, lo=0.1),
        "dimse_timeout_s": net.seconds("dimse_timeout_s", 60.0, lo=0.1),
        "network_timeout_s": net.seconds("network_timeout_s", 120.0, lo=0.1),
        "max_object_mb": net.integer("max_object_mb", 0, 0, 10**7),
        "receiver_processes": 0
        if (net.raw("receiver_processes") or "auto").lower() == "auto"
        else net.integer("receiver_processes", 0, 1, 64),
        "receiver_transport": net.choice("receiver_transport", "lean", ("lean", "pynetdicom")),
    }
    if 0 < network["max_pdu_bytes"] < 4096:  # type: ignore[operator]
        raise net.error("max_pdu_bytes", str(network["max_pdu_bytes"]), "0 or at least 4096")
    net.check_unknown(set(network))

    dirs = section("Directories")
    destination = _path(dirs, "destination_dir", base_dir / DEFAULT_DATA_DIR / "received", base_dir)
    if destination is None:
        raise dirs.error("destination_dir", "", "a folder path")
    layout = dirs.text("folder_layout", DEFAULT_LAYOUT)
    _check_layout(dirs, layout)
    min_free = dirs.integer("min_free_space_mb", 100, 0, 10**9)
    dirs.check_unknown({"destination_dir", "folder_layout", "min_free_space_mb"})

    sec = section("Security")
    trusted_raw = sec.raw("trusted_ae_titles")
    trusted: list[str] = []
    for item in (trusted_raw or "").split(","):
        if not item.strip():
            continue
        if item.strip() == "*":
            trusted.append("*")
            continue
        try:
            trusted.append(validate_ae_title(item))
        except ValueError:
            raise sec.error(
                "trusted_ae_titles",
                item.strip(),
                f"a comma-separated list of AE titles ({_AE_ACCEPTED}) or *",
            ) from None
    if not trusted:
        raise ConfigError(
            f"{source}: [Security] trusted_ae_titles is empty or missing: no sender could connect; "
            "list the calling AE titles to accept, or * to accept any"
        )
    require_called = sec.boolean("require_called_aet", False)
    sec.check_unknown({"trusted_ae_titles", "require_called_aet"})

    mapping_section = section("AE_Mappings")
    mappings: list[tuple[str, Path]] = []
    for key, value in parser.items("AE_Mappings") if parser.has_section("AE_Mappings") else []:
        try:
            aet = validate_ae_title(key)
        except ValueError:
            raise ConfigError(
                f"{source}: [AE_Mappings] {key!r} is not a valid AE title ({_AE_ACCEPTED})"
            ) from None
        value = value.strip()
        if not value or "\x00" in value:
            raise mapping_section.error(
                key, value, "a folder (absolute, UNC, or relative to destination_dir)"
            )
        mappings.append((aet, _resolve(destination, value)))

    hosts: list[tuple[str, tuple[str, ...]]] = []
    for key, value in parser.items("AE_Hosts") if parser.has_section("AE_Hosts") else []:
        try:
            aet = validate_ae_title(key)
        except ValueError:
            raise ConfigError(
                f"{source}: [AE_Hosts] {key!r} is not a valid AE title ({_AE_ACCEPTED})"
            ) from None
        names = tuple(h.strip() for h in value.split(",") if h.strip())
        if not names:
            raise ConfigError(
                f"{source}: [AE_Hosts] {key} is empty; accepted: comma-separated host names or addresses"
            )
        hosts.append((aet, names))

    receiver = ReceiverConfig(
        ae_title=ae_title,
        destination_dir=destination,
        trusted_ae_titles=tuple(trusted),
        require_called_aet=require_called,
        ae_mappings=tuple(mappings),
        ae_hosts=tuple(hosts),
        folder_layout=layout,
        min_free_space_mb=min_free,
        **network,  # type: ignore[arg-type]
    )

    tools_sec = section("Tools")
    emf2sf_path = _path(tools_sec, "emf2sf_path", None, base_dir)
    conversion_raw = tools_sec.raw("enhanced_mr_conversion")
    if conversion_raw is None or conversion_raw == "":
        # The original's semantics: emf2sf when the path points at something usable.
        conversion = "emf2sf" if emf2sf_path is not None and emf2sf_path.exists() else "off"
    else:
        conversion = tools_sec.choice("enhanced_mr_conversion", "off", ("native", "emf2sf", "off"))
    tools = ToolsConfig(
        emf2sf_path=emf2sf_path,
        enhanced_mr_conversion=conversion,
        keep_enhanced_original=tools_sec.boolean("keep_enhanced_original", True),
        emf2sf_timeout_s=tools_sec.seconds("emf2sf_timeout_s", 300.0, lo=1.0),
    )
    if conversion == "emf2sf" and emf2sf_path is None:
        raise tools_sec.error(
            "enhanced_mr_conversion", "emf2sf", "native or off when emf2sf_path is empty"
        )
    tools_sec.check_unknown(
        {"emf2sf_path", "enhanced_mr_conversion", "keep_enhanced_original", "emf2sf_timeout_s"}
    )

    fw = section("FolderWatcher")
    watch = _path(fw, "watch_folder", None, base_dir)
    order_raw = fw.raw("send_order")
    order: tuple[str, ...] = DEFAULT_SEND_ORDER
    if order_raw:
        tokens = tuple(t.strip().upper() for t in order_raw.split(",") if t.strip())
        if (
            not tokens
            or any(t not in _SEND_ORDER_TOKENS for t in tokens)
            or len(set(tokens)) != len(tokens)
        ):
            raise fw.error(
                "send_order",
                order_raw,
                "a comma-separated order of " + ", ".join(DEFAULT_SEND_ORDER),
            )
        order = tokens + tuple(t for t in DEFAULT_SEND_ORDER if t not in tokens)
    forwarder = ForwarderConfig(
        watch_folder=watch if watch is not None else base_dir / DEFAULT_DATA_DIR / "outgoing",
        target_aet=_ae(fw, "target_aet", "", allow_empty=True),
        target_ip=_host(fw, "target_ip", "", allow_empty=True),
        target_port=fw.integer("target_port", 104, 1, 65535),
        calling_aet=_ae(fw, "calling_aet", ae_title),
        max_workers=fw.integer("max_workers", 4, 1, 64),
        heartbeat_interval=fw.seconds("heartbeat_interval", 120.0, lo=1.0),
        process_timer_interval=fw.seconds("process_timer_interval", 10.0, lo=0.1),
        inactivity_timeout=fw.seconds("inactivity_timeout", 5.0),
        use_polling=fw.boolean("use_polling", False),
        send_order=order,
        retry_initial_delay_s=fw.seconds("retry_initial_delay_s", 30.0, lo=0.1),
        retry_max_delay_s=fw.seconds("retry_max_delay_s", 600.0, lo=0.1),
        give_up_after_s=fw.seconds("give_up_after_s", 86400.0),
        acse_timeout_s=fw.seconds("acse_timeout_s", 30.0, lo=0.1),
        dimse_timeout_s=fw.seconds("dimse_timeout_s", 60.0, lo=0.1),
        network_timeout_s=fw.seconds("network_timeout_s", 120.0, lo=0.1),
        max_pdu_bytes=fw.integer("max_pdu_bytes", 1048576, 0, 2**32 - 1),
        transport=fw.choice("transport", "lean", ("lean", "pynetdicom")),
    )
    fw.check_unknown({f.name for f in fields(ForwarderConfig)})
    if bool(forwarder.target_ip) != bool(forwarder.target_aet):
        missing = "target_aet" if forwarder.target_ip else "target_ip"
        raise ConfigError(
            f"{source}: [FolderWatcher] {missing} is empty; set both target_aet and target_ip, "
            "or neither to disable forwarding"
        )

    tls_sec = section("TLS")
    tls = TlsConfig(
        enabled=tls_sec.boolean("enabled", False),
        certificate=_path(tls_sec, "certificate", None, base_dir),
        private_key=_path(tls_sec, "private_key", None, base_dir),
        ca_bundle=_path(tls_sec, "ca_bundle", None, base_dir),
        require_client_cert=tls_sec.boolean("require_client_cert", True),
        min_version=tls_sec.choice("min_version", "1.2", ("1.2", "1.3")),
    )
    tls_sec.check_unknown({f.name for f in fields(TlsConfig)})
    if tls.enabled and (tls.certificate is None or tls.private_key is None):
        raise ConfigError(f"{source}: [TLS] enabled = true needs certificate and private_key")

    log_sec = section("Logging")
    logging_cfg = LoggingConfig(
        verbose=log_sec.boolean("verbose", False),
        log_file=_path(log_sec, "log_file", None, base_dir),
        log_max_mb=log_sec.integer("log_max_mb", 10, 1, 10**6),
        log_backup_count=log_sec.integer("log_backup_count", 10, 0, 1000),
        pynetdicom_level=log_sec.choice(
            "pynetdicom_level", "warning", ("debug", "info", "warning", "error", "critical")
        ).upper(),
    )
    log_sec.check_unknown({f.name for f in fields(LoggingConfig)})

    return NodeConfig(
        source=source,
        window_title=window_title,
        receiver=receiver,
        forwarder=forwarder,
        tools=tools,
        tls=tls,
        logging=logging_cfg,
        ledger=_parse_ledger(section("Ledger"), base_dir),
        web=_parse_web(section("Web"), base_dir, tls),
    )


def _parse_ledger(sec: _Section, base_dir: Path) -> LedgerConfig:
    ledger = LedgerConfig(
        enabled=sec.boolean("enabled", True),
        location=_path(sec, "location", None, base_dir),
        retention_days=sec.integer("retention_days", 365, 0, 100000),
    )
    sec.check_unknown({f.name for f in fields(LedgerConfig)})
    return ledger


def _parse_web(sec: _Section, base_dir: Path, tls: TlsConfig) -> WebConfig:
    web = WebConfig(
        enabled=sec.boolean("enabled", False),
        address=_host(sec, "address", "127.0.0.1", allow_empty=False),
        port=sec.integer("port", 8080, 1, 65535),
        credentials_file=_path(sec, "credentials_file", None, base_dir),
        https=sec.boolean("https", False),
        certificate=_path(sec, "certificate", None, base_dir),
        private_key=_path(sec, "private_key", None, base_dir),
        session_timeout_s=sec.seconds("session_timeout_s", 3600.0, lo=10.0),
    )
    sec.check_unknown({f.name for f in fields(WebConfig)})
    if web.https:
        cert = web.certificate or tls.certificate
        key = web.private_key or tls.private_key
        if cert is None or key is None:
            raise ConfigError(
                f"{sec.source}: [Web] https = true needs certificate and private_key "
                "(in [Web], or in [TLS] to reuse the DICOM TLS certificate)"
            )
        web = replace(web, certificate=cert, private_key=key)
    return web


def _check_layout(section: _Section, layout: str) -> None:
    accepted = "a /-separated template of " + ", ".join(
        "{" + f + "}" for f in sorted(LAYOUT_FIELDS)
    )
    names = re.findall(r"{([^{}]*)}", layout)
    if not layout or not names or any(n not in LAYOUT_FIELDS for n in names):
        raise section.error("folder_layout", layout, accepted)
    if PurePosixPath(layout).is_absolute() or ".." in layout.replace("\\", "/").split("/"):
        raise section.error("folder_layout", layout, accepted)


def load(path: Path | None) -> NodeConfig:
    """Load the configuration file ``path``, or the embedded default when None.

    Relative paths in a file are resolved against the file's folder; those of
    the embedded default against the current working directory.

    Raises
    ------
    ConfigError
        When the file cannot be read or is invalid.
    """
    if path is None:
        return parse(EMBEDDED_DEFAULT, "embedded default", Path.cwd())
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = path.read_text(encoding="cp1252")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read configuration file: {exc.strerror or exc}"
        ) from None
    return parse(text, str(path.resolve()), path.resolve().parent)


def find_config(explicit: Path | None, cwd: Path) -> Path | None:
    """Return the configuration file to use: ``explicit``, else ``./config.ini`` if present.

    Raises
    ------
    ConfigError
        When ``explicit`` is given but does not exist.
    """
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: configuration file not found")
        return explicit
    candidate = cwd / "config.ini"
    return candidate if candidate.is_file() else None


def route_for(receiver: ReceiverConfig, calling_aet: str) -> Path:
    """Return the folder for objects from ``calling_aet`` ([AE_Mappings] or ``incoming``).

    An exact AE title match wins; otherwise a case-insensitive match is used.
    """
    for aet, folder in receiver.ae_mappings:
        if aet == calling_aet:
            return folder
    for aet, folder in receiver.ae_mappings:
        if aet.upper() == calling_aet.upper():
            return folder
    return receiver.destination_dir / "incoming"


def hosts_for(receiver: ReceiverConfig, calling_aet: str) -> tuple[str, ...] | None:
    """Return the hosts ``calling_aet`` may connect from, or None when unrestricted."""
    for aet, names in receiver.ae_hosts:
        if aet == calling_aet:
            return names
    return None


_RECEIVER_SECTIONS: Final = {
    "Network": (
        "server_ip",
        "receive_port",
        "max_pdu_bytes",
        "max_associations",
        "acse_timeout_s",
        "dimse_timeout_s",
        "network_timeout_s",
        "max_object_mb",
        "receiver_processes",
        "receiver_transport",
    ),
    "Directories": ("destination_dir", "folder_layout", "min_free_space_mb"),
    "Security": ("trusted_ae_titles", "require_called_aet"),
}


def _show(value: object, key: str = "") -> str:
    if key == "receiver_processes" and value == 0:
        return "auto"
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def describe(config: NodeConfig) -> list[str]:
    """Return the effective configuration as INI lines, in the original's sections."""
    rc = config.receiver
    lines = [f"# effective configuration, source: {config.source}", "[General]"]
    lines += [f"ae_title = {rc.ae_title}", f"window_title = {config.window_title}"]
    for title, keys in _RECEIVER_SECTIONS.items():
        lines.append(f"[{title}]")
        lines.extend(f"{k} = {_show(getattr(rc, k), k)}" for k in keys)
    lines.append("[AE_Mappings]")
    lines.extend(f"{aet} = {folder}" for aet, folder in rc.ae_mappings)
    lines.append("[AE_Hosts]")
    lines.extend(f"{aet} = {', '.join(names)}" for aet, names in rc.ae_hosts)
    sections: tuple[tuple[str, object], ...] = (
        ("Tools", config.tools),
        ("FolderWatcher", config.forwarder),
        ("TLS", config.tls),
        ("Logging", config.logging),
        ("Ledger", config.ledger),
        ("Web", config.web),
    )
    for title, obj in sections:
        lines.append(f"[{title}]")
        lines.extend(f"{f.name} = {_show(getattr(obj, f.name))}" for f in fields(obj))  # type: ignore[arg-type]
    return lines
