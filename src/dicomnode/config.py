"""Read and validate the INI configuration into frozen dataclasses.

Every key is declared once, as a field of one of the dataclasses below made
with :func:`setting`: its INI section, its name (the field name), its kind,
default, bounds and help text. :func:`parse`, :func:`describe` (``dicomnode
check-config``), :func:`reference_table` (the README's table) and the test of
``config.example.ini`` all read those declarations; a new key is one new
field. :func:`load` is the only reader of configuration files. It accepts the
original tool's ``config.ini`` unchanged (inline ``# comments``, Windows paths,
mixed-case AE titles) and rejects anything it does not understand with a
:class:`~dicomnode.errors.ConfigError` that names file, section, key and the
accepted values. Imports only the standard library and :mod:`dicomnode.errors`.

Length: about 1100 lines, on purpose. Half of it is the declarations (one
:func:`setting` per key with its bounds and help text, which the README table
and ``check-config`` print); they must sit next to the one parser that reads
them, or a key would again be described in two places.
"""

from __future__ import annotations

import configparser
import enum
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Final, TypeVar

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

#: Sections in the order of the original's file (then the new ones).
SECTIONS: Final = (
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
    "Audit",
    "Destination:NAME",
    "Route:NAME",
)
#: The ``[Destination:NAME]`` family: one section per remote AE the node talks to,
#: named by the site (NAME); its keys are declared once, in :class:`DestinationConfig`.
DESTINATION_PREFIX: Final = "Destination:"
DESTINATION_SECTION: Final = "Destination:NAME"
#: The ``[Route:NAME]`` family: which files go to which destinations (:class:`RouteConfig`).
ROUTE_PREFIX: Final = "Route:"
ROUTE_SECTION: Final = "Route:NAME"
#: The destination ``[FolderWatcher] target_*`` defines, and where unrouted files go.
DEFAULT_DESTINATION: Final = "default"
#: Sections whose keys are AE titles chosen by the site, not declared names.
FREE_FORM_SECTIONS: Final = frozenset({"AE_Mappings", "AE_Hosts"})


# --------------------------------------------------------------------------- declarations


class Kind(enum.Enum):
    """How a key's text becomes a value (and back, for ``check-config``)."""

    TEXT = "text"
    INT = "whole number"
    SECONDS = "seconds"
    BOOL = "true/false"
    CHOICE = "choice"
    PATH = "path"
    AE = "AE title"
    HOST = "host"
    #: Read by dedicated code in :func:`parse` (lists, templates, dynamic defaults).
    SPECIAL = "special"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """The declaration of one INI key (kept in its dataclass field's metadata).

    Attributes
    ----------
    section : str
        INI section of the key; the key's name is the field's name.
    kind : Kind
        How its text is converted.
    help : str
        One line for the README table and the example configuration.
    lo, hi : float or None
        Inclusive bounds of INT and SECONDS keys (SECONDS: ``hi`` exclusive, 1e9).
    choices : tuple of str
        Accepted values of a CHOICE key (lower case).
    allow_empty : bool
        Whether an empty value is accepted (an empty target, an unset optional path).
    site_specific : bool
        True when ``config.example.ini`` shows a typical site's value rather than the
        default (the original tool's keys, the recommended conversion).
    shown_default : str or None
        How the default is written in the INI file when it is not the field's default
        (``auto`` for 0 receiver processes, ``ae_title``'s value for ``calling_aet``).
    """

    section: str
    kind: Kind
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    allow_empty: bool = False
    site_specific: bool = False
    shown_default: str | None = None

    def accepted(self) -> str:
        """Return the accepted values as an error message states them."""
        if self.kind is Kind.INT:
            return f"a whole number from {self.lo:g} to {self.hi:g}"
        if self.kind is Kind.SECONDS:
            return f"a number of seconds >= {self.lo or 0:g}"
        if self.kind is Kind.BOOL:
            return "true or false (also yes/no, on/off, 1/0)"
        if self.kind is Kind.CHOICE:
            return " | ".join(self.choices)
        if self.kind is Kind.AE:
            return _AE_ACCEPTED
        if self.kind is Kind.HOST:
            return "an IP address or host name"
        if self.kind is Kind.PATH:
            return "a folder path"
        return self.help


_SPEC: Final = "dicomnode.key"


def setting(
    default: Any,
    section: str,
    kind: Kind,
    help: str,
    **options: Any,
) -> Any:
    """Declare one INI key as a dataclass field (see :class:`KeySpec` for ``options``).

    Returns
    -------
    dataclasses.Field
        A field whose default is ``default`` and whose metadata holds the declaration.
    """
    spec = KeySpec(section, kind, help, **options)
    return field(default=default, metadata={_SPEC: spec})


def declared_keys(cls: type) -> Iterator[tuple[Field[Any], KeySpec]]:
    """Yield ``(field, spec)`` for every declared key of config dataclass ``cls``."""
    for f in fields(cls):
        spec = f.metadata.get(_SPEC)
        if isinstance(spec, KeySpec):
            yield f, spec


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """One ``[Destination:NAME]`` section: a remote AE, its address and how we send to it.

    The forwarder sends to the destinations the ``[Route:NAME]`` sections name
    (``default``, defined by ``[FolderWatcher] target_*``, when there are no
    routes); the receiver sends storage commitment reports on a new association
    to the destination whose ``ae_title`` is the requester's calling AE. Empty
    ``calling_aet`` and unset retry keys take the ``[FolderWatcher]`` values
    (:meth:`ForwarderConfig.for_destination`). A destination with
    ``storage_commitment`` is asked to commit what it acknowledged, and the
    receiver admits its reports (:attr:`ReceiverConfig.commitment_store`).
    """

    name: str = ""
    ae_title: str = setting(
        "",
        DESTINATION_SECTION,
        Kind.AE,
        "AE title of the remote node (required)",
        site_specific=True,
    )
    host: str = setting(
        "",
        DESTINATION_SECTION,
        Kind.HOST,
        "Its IP address or host name (required)",
        site_specific=True,
    )
    port: int = setting(
        104, DESTINATION_SECTION, Kind.INT, "Its DICOM port", lo=1, hi=65535, site_specific=True
    )
    calling_aet: str = setting(
        "",
        DESTINATION_SECTION,
        Kind.AE,
        "Our AE title towards it (empty: [FolderWatcher] calling_aet)",
        allow_empty=True,
    )
    tls: bool = setting(
        False,
        DESTINATION_SECTION,
        Kind.BOOL,
        "Send to it over DICOM TLS (certificates from [TLS])",
    )
    max_associations: int = setting(
        1,
        DESTINATION_SECTION,
        Kind.INT,
        "Associations at once to it while sending one group's images",
        lo=1,
        hi=32,
    )
    retry_initial_delay_s: float | None = setting(
        None,
        DESTINATION_SECTION,
        Kind.SECONDS,
        "First retry after a network failure (empty: the [FolderWatcher] value)",
        lo=0.1,
        allow_empty=True,
    )
    retry_max_delay_s: float | None = setting(
        None,
        DESTINATION_SECTION,
        Kind.SECONDS,
        "Longest wait between retries (empty: the [FolderWatcher] value)",
        lo=0.1,
        allow_empty=True,
    )
    give_up_after_s: float | None = setting(
        None,
        DESTINATION_SECTION,
        Kind.SECONDS,
        "After this long failing, its copies are parked (empty: the [FolderWatcher] value)",
        allow_empty=True,
    )

    rt_completeness_wait_s: float | None = setting(
        None,
        DESTINATION_SECTION,
        Kind.SECONDS,
        "RT completeness wait for this destination (empty: [FolderWatcher] rt_completeness_wait_s)",
        allow_empty=True,
    )
    storage_commitment: bool = setting(
        False,
        DESTINATION_SECTION,
        Kind.BOOL,
        "Forwarding to it: keep acknowledged files until it commits them (N-ACTION, report)",
    )
    commitment_timeout_s: float = setting(
        600.0,
        DESTINATION_SECTION,
        Kind.SECONDS,
        "No commitment report this long after the request: ask again (like a network failure)",
        lo=1.0,
    )
    commitment_max_attempts: int = setting(
        3,
        DESTINATION_SECTION,
        Kind.INT,
        "Requests (and sends of a failed instance) before its files are parked in failed/",
        lo=1,
        hi=100,
    )

    @property
    def address(self) -> str:
        """Return ``AE@host:port`` as log lines name the remote node."""
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One ``[Route:NAME]`` section: the files it matches go to its destinations.

    Every filter that is set must match (a list matches any of its values); a
    route without filters matches every file. ``sop_class`` holds UIDs (keywords
    are resolved when the file is read), ``tags`` the ``tag:<Keyword> = glob``
    keys as (keyword, globs) pairs.
    """

    name: str = ""
    destinations: tuple[str, ...] = setting(
        (),
        ROUTE_SECTION,
        Kind.SPECIAL,
        "Destination names the matching files go to (required; comma-separated)",
        site_specific=True,
    )
    calling_ae: tuple[str, ...] = setting(
        (),
        ROUTE_SECTION,
        Kind.SPECIAL,
        "Filter: the sender's AE title the receiver wrote (File Meta Source AE Title)",
        site_specific=True,
    )
    modality: tuple[str, ...] = setting(
        (), ROUTE_SECTION, Kind.SPECIAL, "Filter: Modality (e.g. CT, RTPLAN)", site_specific=True
    )
    sop_class: tuple[str, ...] = setting(
        (),
        ROUTE_SECTION,
        Kind.SPECIAL,
        "Filter: SOP Class UID or pydicom keyword (e.g. RTPlanStorage)",
        site_specific=True,
    )
    folder: tuple[str, ...] = setting(
        (),
        ROUTE_SECTION,
        Kind.SPECIAL,
        "Filter: glob on the group's top-level folder name; also tag:<Keyword> = glob",
        site_specific=True,
    )
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()


def section_family(name: str) -> str:
    """Return the declared section of INI section ``name`` (``Destination:X`` → ``Destination:NAME``)."""
    if name.startswith(DESTINATION_PREFIX):
        return DESTINATION_SECTION
    return ROUTE_SECTION if name.startswith(ROUTE_PREFIX) else name


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """Settings of the C-STORE/C-ECHO SCP ([General], [Network], [Directories], [Security],
    [AE_Mappings], [AE_Hosts]); each field's declaration gives its key, default and bounds."""

    ae_title: str = setting(
        "DICOMNODE",
        "General",
        Kind.AE,
        "AE title of this node (1-16 characters)",
        site_specific=True,
    )
    server_ip: str = setting(
        "127.0.0.1",
        "Network",
        Kind.HOST,
        "Address to bind (127.0.0.1 = this computer only, 0.0.0.0 = all)",
        site_specific=True,
    )
    receive_port: int = setting(
        11112, "Network", Kind.INT, "TCP port for receiving", lo=1, hi=65535, site_specific=True
    )
    destination_dir: Path = setting(
        Path(DEFAULT_DATA_DIR) / "received",
        "Directories",
        Kind.PATH,
        "Base folder of received objects (relative: to the configuration file's folder)",
        site_specific=True,
    )
    trusted_ae_titles: tuple[str, ...] = setting(
        ("*",),
        "Security",
        Kind.SPECIAL,
        "Comma-separated calling AE titles allowed to associate (case-sensitive); * = any",
        shown_default="(required)",
        site_specific=True,
    )
    require_called_aet: bool = setting(
        False, "Security", Kind.BOOL, "Reject associations not addressed to ae_title"
    )
    ae_mappings: tuple[tuple[str, Path], ...] = setting(
        (),
        "AE_Mappings",
        Kind.SPECIAL,
        "AE = folder: objects from that calling AE go there (relative: to destination_dir)",
        site_specific=True,
    )
    ae_hosts: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (),
        "AE_Hosts",
        Kind.SPECIAL,
        "AE = hosts, addresses or networks the AE may connect from",
    )
    folder_layout: str = setting(
        DEFAULT_LAYOUT,
        "Directories",
        Kind.SPECIAL,
        "Folders below the AE folder: a /-separated template of "
        + ", ".join("{" + f + "}" for f in sorted(LAYOUT_FIELDS)),
    )
    max_pdu_bytes: int = setting(
        1048576,
        "Network",
        Kind.INT,
        "Largest PDU we accept (0 = unlimited, else at least 4096)",
        lo=0,
        hi=2**32 - 1,
    )
    max_associations: int = setting(
        16,
        "Network",
        Kind.INT,
        "Associations served at once, node-wide; more are rejected (transient)",
        lo=1,
        hi=1000,
    )
    max_pending_associations: int = setting(
        128,
        "Network",
        Kind.INT,
        "Connections still negotiating (no whole A-ASSOCIATE-RQ yet), node-wide; beyond it "
        "the oldest such connection is closed for the new one",
        lo=1,
        hi=100000,
    )
    max_pending_per_peer: int = setting(
        16,
        "Network",
        Kind.INT,
        "Connections still negotiating per peer IP address (same rule)",
        lo=1,
        hi=100000,
    )
    refusal_log_interval_s: float = setting(
        60.0,
        "Network",
        Kind.SECONDS,
        "Log a refusal from one peer address at most once per interval, with a count of "
        "the repeats (0 = every refusal)",
    )
    acse_timeout_s: float = setting(
        30.0,
        "Network",
        Kind.SECONDS,
        "Time from connect to a whole association request, TLS handshake included",
        lo=0.1,
    )
    dimse_timeout_s: float = setting(
        60.0, "Network", Kind.SECONDS, "Not used by the receiver (kept for old files)", lo=0.1
    )
    network_timeout_s: float = setting(
        120.0, "Network", Kind.SECONDS, "Silence after which a stalled peer is dropped", lo=0.1
    )
    max_object_mb: int = setting(
        0, "Network", Kind.INT, "Refuse (0xA700) larger objects; 0 = no limit", lo=0, hi=10**7
    )
    min_free_space_mb: int = setting(
        100,
        "Directories",
        Kind.INT,
        "Refuse stores (0xA700) while the destination or the AE folder has less free space",
        lo=0,
        hi=10**9,
    )
    journal_mb: int = setting(
        64,
        "Directories",
        Kind.INT,
        "Size of each receiver process's receive journal under destination_dir/.incoming-tmp/journal; "
        "objects up to 256 KB (and a quarter of it) are made durable by one journal flush, "
        "larger ones by fsync of file and folder; 0 = no journal (fsync every object)",
        lo=0,
        hi=65536,
    )
    receiver_processes: int = setting(
        0,
        "Network",
        Kind.SPECIAL,
        "Receiver processes sharing the port; auto = one per CPU (max 4) on POSIX, 1 on Windows",
        shown_default="auto",
    )
    receiver_transport: str = setting(
        "lean",
        "Network",
        Kind.CHOICE,
        "Retired: only the built-in SCP remains (pynetdicom logs DEPRECATED)",
        choices=("lean", "pynetdicom"),
    )
    #: The [Destination:NAME] sections (the node's too): where storage commitment
    #: reports go when they cannot be sent on the requester's association.
    destinations: tuple[DestinationConfig, ...] = ()
    #: Where the forwarder keeps its storage commitment requests (the watch folder's
    #: ``.dicomnode-commitment``) when a destination has ``storage_commitment``: the
    #: receiver records the reports answering them there. None: no such destination.
    commitment_store: Path | None = None
    #: The destinations the forwarder asks for storage commitment (their reports are admitted).
    commitment_destinations: tuple[DestinationConfig, ...] = ()

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
    """Settings of the folder watcher that forwards to one target node ([FolderWatcher])."""

    watch_folder: Path = setting(
        Path(DEFAULT_DATA_DIR) / "outgoing",
        "FolderWatcher",
        Kind.PATH,
        "Folder whose top-level subfolders are sent as groups",
        allow_empty=True,
        site_specific=True,
    )
    target_aet: str = setting(
        "",
        "FolderWatcher",
        Kind.AE,
        "Target AE title (empty, with target_ip: no forwarding)",
        allow_empty=True,
        site_specific=True,
    )
    target_ip: str = setting(
        "", "FolderWatcher", Kind.HOST, "Target address", allow_empty=True, site_specific=True
    )
    target_port: int = setting(
        104, "FolderWatcher", Kind.INT, "Target TCP port", lo=1, hi=65535, site_specific=True
    )
    calling_aet: str = setting(
        "DICOMNODE",
        "FolderWatcher",
        Kind.AE,
        "Our AE title when sending (default: ae_title)",
        shown_default="ae_title",
        site_specific=True,
    )
    max_workers: int = setting(
        4, "FolderWatcher", Kind.INT, "Groups sent in parallel", lo=1, hi=64, site_specific=True
    )
    heartbeat_interval: float = setting(
        120.0,
        "FolderWatcher",
        Kind.SECONDS,
        "Seconds between HEARTBEAT lines",
        lo=1.0,
        site_specific=True,
    )
    process_timer_interval: float = setting(
        10.0,
        "FolderWatcher",
        Kind.SECONDS,
        "Full rescan of the watch folder every N seconds",
        lo=0.1,
        site_specific=True,
    )
    inactivity_timeout: float = setting(
        5.0,
        "FolderWatcher",
        Kind.SECONDS,
        "A group is sent after N seconds without changes",
        site_specific=True,
    )
    use_polling: bool = setting(
        False, "FolderWatcher", Kind.BOOL, "Rescans only, no file-system events (network shares)"
    )
    send_order: tuple[str, ...] = setting(
        DEFAULT_SEND_ORDER,
        "FolderWatcher",
        Kind.SPECIAL,
        "Order of object classes in a group (a partial list is completed)",
    )
    retry_initial_delay_s: float = setting(
        30.0,
        "FolderWatcher",
        Kind.SECONDS,
        "First retry after a network failure; doubles each time",
        lo=0.1,
    )
    retry_max_delay_s: float = setting(
        600.0, "FolderWatcher", Kind.SECONDS, "Longest wait between retries", lo=0.1
    )
    give_up_after_s: float = setting(
        86400.0, "FolderWatcher", Kind.SECONDS, "After this long failing, files are parked"
    )
    max_object_refusals: int = setting(
        3,
        "FolderWatcher",
        Kind.INT,
        "Park an object the target refused temporarily (0xA7xx) this often while accepting others",
        lo=1,
        hi=1000,
    )
    max_associations: int = setting(
        1,
        "FolderWatcher",
        Kind.INT,
        "Associations at once to the target while sending one group (each send-order "
        "class waits for the one before)",
        lo=1,
        hi=32,
    )
    rt_completeness_wait_s: float = setting(
        300.0,
        "FolderWatcher",
        Kind.SECONDS,
        "Hold a group whose RT objects miss what they reference (plan, structure set, "
        "image series) up to N s from first ready (0 = no check)",
    )
    rt_incomplete_action: str = setting(
        "send",
        "FolderWatcher",
        Kind.CHOICE,
        "After that wait: send what is there, or park the group in failed/",
        choices=("send", "park"),
    )
    acse_timeout_s: float = setting(
        30.0, "FolderWatcher", Kind.SECONDS, "Time allowed for the association", lo=0.1
    )
    dimse_timeout_s: float = setting(
        60.0, "FolderWatcher", Kind.SECONDS, "Time allowed for each C-STORE response", lo=0.1
    )
    network_timeout_s: float = setting(
        120.0, "FolderWatcher", Kind.SECONDS, "Silence after which the target is dropped", lo=0.1
    )
    max_pdu_bytes: int = setting(
        1048576,
        "FolderWatcher",
        Kind.INT,
        "Largest PDU we accept on the sending association (0 = unlimited)",
        lo=0,
        hi=2**32 - 1,
    )
    transport: str = setting(
        "lean",
        "FolderWatcher",
        Kind.CHOICE,
        "Retired: only the built-in SCU remains (pynetdicom logs DEPRECATED)",
        choices=("lean", "pynetdicom"),
    )
    unrouted: str = setting(
        "default",
        "FolderWatcher",
        Kind.CHOICE,
        "A file no [Route:NAME] matches: to destination default (if defined), or park it",
        choices=("default", "park"),
    )
    duplicate_window_s: float = setting(
        3600.0,
        "FolderWatcher",
        Kind.SECONDS,
        "An object a destination acknowledged (same SOP Instance UID and content) is not "
        "sent to it again within N seconds (0 = off)",
    )
    #: Where the forwarder sends: ``default`` (from target_*) and the [Destination:NAME]
    #: sections; filled by :func:`parse`.
    destinations: tuple[DestinationConfig, ...] = ()
    #: The [Route:NAME] sections, in file order; empty = everything to ``default``.
    routes: tuple[RouteConfig, ...] = ()

    @property
    def has_target(self) -> bool:
        """Return True when a target node is configured."""
        return bool(self.target_ip and self.target_aet)

    @property
    def forwards(self) -> bool:
        """Return True when the forwarder has somewhere to send (a ``default`` or a route)."""
        return bool(self.routes) or self.destination(DEFAULT_DESTINATION) is not None

    def all_destinations(self) -> tuple[DestinationConfig, ...]:
        """Return every destination: ``destinations``, plus ``default`` from target_* if missing.

        :func:`parse` already puts ``default`` in ``destinations``; a configuration
        built in code with only target_* gets it here.
        """
        if not self.has_target or any(d.name == DEFAULT_DESTINATION for d in self.destinations):
            return self.destinations
        default = DestinationConfig(
            name=DEFAULT_DESTINATION,
            ae_title=self.target_aet,
            host=self.target_ip,
            port=self.target_port,
            max_associations=self.max_associations,
        )
        return (default, *self.destinations)

    def destination(self, name: str) -> DestinationConfig | None:
        """Return the destination called ``name``, or None."""
        return next((d for d in self.all_destinations() if d.name == name), None)

    def routed_destinations(self) -> tuple[DestinationConfig, ...]:
        """Return the destinations files can go to (named by a route, or ``default``)."""
        names = {n for r in self.routes for n in r.destinations}
        if not self.routes or self.unrouted == "default":
            names.add(DEFAULT_DESTINATION)
        return tuple(d for d in self.all_destinations() if d.name in names)

    def for_destination(self, dest: DestinationConfig) -> ForwarderConfig:
        """Return this configuration aimed at ``dest`` (target, calling AE, retry keys).

        The result is what the SCU and the retry policy of one destination read;
        unset keys of ``dest`` keep the [FolderWatcher] values.
        """
        return replace(
            self,
            target_aet=dest.ae_title,
            target_ip=dest.host,
            target_port=dest.port,
            calling_aet=dest.calling_aet or self.calling_aet,
            retry_initial_delay_s=_or(dest.retry_initial_delay_s, self.retry_initial_delay_s),
            retry_max_delay_s=_or(dest.retry_max_delay_s, self.retry_max_delay_s),
            give_up_after_s=_or(dest.give_up_after_s, self.give_up_after_s),
        )

    @property
    def failed_dir(self) -> Path:
        """Return the folder where undeliverable files are parked."""
        return self.watch_folder / "failed"


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    """Enhanced multi-frame conversion settings ([Tools])."""

    emf2sf_path: Path | None = setting(
        None,
        "Tools",
        Kind.PATH,
        "dcm4che's bin folder or the emf2sf executable",
        allow_empty=True,
        site_specific=True,
    )
    enhanced_mr_conversion: str = setting(
        "off",
        "Tools",
        Kind.SPECIAL,
        "native | emf2sf | off (absent: emf2sf if emf2sf_path exists, else off)",
        choices=("native", "emf2sf", "off"),
        site_specific=True,
    )
    keep_enhanced_original: bool = setting(
        True, "Tools", Kind.BOOL, "Keep the received enhanced object in its series folder"
    )
    emf2sf_timeout_s: float = setting(
        300.0, "Tools", Kind.SECONDS, "Time limit of one emf2sf run", lo=1.0
    )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """DICOM TLS settings ([TLS]); disabled unless ``enabled = true``."""

    enabled: bool = setting(False, "TLS", Kind.BOOL, "DICOM TLS for receiver and forwarder")
    certificate: Path | None = setting(
        None, "TLS", Kind.PATH, "PEM certificate of this node", allow_empty=True
    )
    private_key: Path | None = setting(None, "TLS", Kind.PATH, "PEM private key", allow_empty=True)
    ca_bundle: Path | None = setting(
        None,
        "TLS",
        Kind.PATH,
        "PEM CA certificates that sign peers' certificates",
        allow_empty=True,
    )
    require_client_cert: bool = setting(
        True, "TLS", Kind.BOOL, "Receiver: refuse peers without a valid certificate"
    )
    min_version: str = setting(
        "1.2", "TLS", Kind.CHOICE, "Oldest TLS version accepted", choices=("1.2", "1.3")
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Logging settings ([Logging])."""

    verbose: bool = setting(
        False, "Logging", Kind.BOOL, "DEBUG level for dicomnode (else INFO)", site_specific=True
    )
    log_file: Path | None = setting(
        None, "Logging", Kind.PATH, "Optional rotating log file", allow_empty=True
    )
    log_max_mb: int = setting(10, "Logging", Kind.INT, "Rotate at this size", lo=1, hi=10**6)
    log_backup_count: int = setting(10, "Logging", Kind.INT, "Rotated files kept", lo=0, hi=1000)
    pynetdicom_level: str = setting(
        "WARNING",
        "Logging",
        Kind.SPECIAL,
        "Not used (the node no longer runs pynetdicom; kept for old files)",
        choices=("debug", "info", "warning", "error", "critical"),
    )


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """The event ledger ([Ledger]): an embedded SQLite (WAL) record of every event."""

    enabled: bool = setting(True, "Ledger", Kind.BOOL, "Record every event in the ledger")
    location: Path | None = setting(
        None,
        "Ledger",
        Kind.PATH,
        "Ledger file (default: <destination_dir>/.ledger/ledger.sqlite)",
        allow_empty=True,
    )
    retention_days: int = setting(
        365, "Ledger", Kind.INT, "Events older than this are deleted (0 = keep)", lo=0, hi=100000
    )


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The operator console, /metrics and /healthz ([Web])."""

    enabled: bool = setting(
        False, "Web", Kind.BOOL, "Serve the console (on in the embedded default)"
    )
    address: str = setting(
        "127.0.0.1", "Web", Kind.HOST, "Console address; not loopback: credentials needed"
    )
    port: int = setting(8080, "Web", Kind.INT, "Console TCP port", lo=1, hi=65535)
    credentials_file: Path | None = setting(
        None,
        "Web",
        Kind.PATH,
        "Users and salted password hashes (default: web-users beside the ledger)",
        allow_empty=True,
    )
    https: bool = setting(False, "Web", Kind.BOOL, "Serve HTTPS")
    certificate: Path | None = setting(
        None,
        "Web",
        Kind.PATH,
        "PEM certificate for HTTPS (empty: [TLS] certificate)",
        allow_empty=True,
    )
    private_key: Path | None = setting(
        None, "Web", Kind.PATH, "PEM key for HTTPS (empty: [TLS] private_key)", allow_empty=True
    )
    session_timeout_s: float = setting(
        3600.0, "Web", Kind.SECONDS, "A login expires after this long idle", lo=10.0
    )


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """DICOM audit messages to an audit repository ([Audit])."""

    syslog: str = setting(
        "",
        "Audit",
        Kind.TEXT,
        "udp://host:port or tcp+tls://host:port: PS3.15 audit messages over syslog (empty: off)",
    )


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The whole validated configuration of one node."""

    source: str = "embedded default"
    window_title: str = setting(
        "dicomnode", "General", Kind.TEXT, "Console window title", site_specific=True
    )
    stop_grace_s: float = setting(
        5.0,
        "General",
        Kind.SECONDS,
        "On a stop (Ctrl+C, SIGTERM, service stop), how long running transfers may finish "
        "before they are aborted (a second signal aborts at once)",
        lo=0.1,
        hi=3600.0,
    )
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    web: WebConfig = field(default_factory=WebConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    destinations: tuple[DestinationConfig, ...] = ()

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
        forwarder = replace(self.forwarder, watch_folder=path)
        return replace(
            self, forwarder=forwarder, receiver=with_commitment(self.receiver, forwarder)
        )


#: Hidden folder of the watch folder holding the storage commitment requests of the
#: forwarder, the files they are about and the reports answering them.
COMMITMENT_STORE_NAME: Final = ".dicomnode-commitment"


def with_commitment(receiver: ReceiverConfig, forwarder: ForwarderConfig) -> ReceiverConfig:
    """Return ``receiver`` told where the forwarder's commitment requests are and who reports.

    The committing destinations are those the forwarder sends to that have
    ``storage_commitment = true`` (``default`` included); none: no store.
    """
    committing = tuple(d for d in forwarder.routed_destinations() if d.storage_commitment)
    store = forwarder.watch_folder / COMMITMENT_STORE_NAME if committing else None
    return replace(receiver, commitment_store=store, commitment_destinations=committing)


#: The config dataclasses and how to reach each one's instance from a NodeConfig.
HOLDERS: Final[tuple[tuple[type, Callable[[NodeConfig], object]], ...]] = (
    (ReceiverConfig, lambda c: c.receiver),
    (NodeConfig, lambda c: c),
    (ToolsConfig, lambda c: c.tools),
    (ForwarderConfig, lambda c: c.forwarder),
    (TlsConfig, lambda c: c.tls),
    (LoggingConfig, lambda c: c.logging),
    (LedgerConfig, lambda c: c.ledger),
    (WebConfig, lambda c: c.web),
    (AuditConfig, lambda c: c.audit),
)
#: Config dataclasses of section families (one instance per section), for :func:`all_keys`.
FAMILIES: Final[tuple[type, ...]] = (DestinationConfig, RouteConfig)


def all_keys() -> list[tuple[str, str, Field[Any], KeySpec, type]]:
    """Return ``(section, key, field, spec, class)`` of every declared key, in section order."""
    classes = [cls for cls, _ in HOLDERS] + list(FAMILIES)
    found = [
        (spec.section, f.name, f, spec, cls) for cls in classes for f, spec in declared_keys(cls)
    ]
    return sorted(found, key=lambda k: SECTIONS.index(k[0]))


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

    def read(self, key: str, spec: KeySpec, default: Any, base: Path) -> Any:
        """Return the value of declared key ``key`` (``default`` when absent)."""
        kind = spec.kind
        if kind is Kind.TEXT:
            value = self.raw(key)
            return default if value is None else value
        if kind is Kind.INT:
            lo, hi = int(spec.lo or 0), int(spec.hi or 0)

            def to_int(v: str) -> int:
                n = int(v, 10)
                if not lo <= n <= hi:
                    raise ValueError(v)
                return n

            return self.get(key, default, to_int, spec.accepted())
        if kind is Kind.SECONDS:
            lo_s = spec.lo or 0.0

            def to_seconds(v: str) -> float:
                n = float(v)
                if not (n >= lo_s and n < 1e9):
                    raise ValueError(v)
                return n

            return self.get(key, default, to_seconds, spec.accepted())
        if kind is Kind.BOOL:
            return self.get(key, default, _to_bool, spec.accepted())
        if kind is Kind.CHOICE:

            def to_choice(v: str) -> str:
                if v.lower() not in spec.choices:
                    raise ValueError(v)
                return v.lower()

            return self.get(key, default, to_choice, spec.accepted())
        if kind is Kind.PATH:
            return self._path(key, spec, default, base)
        if kind is Kind.AE:
            return self._ae(key, spec, default)
        if kind is Kind.HOST:
            return self._host(key, spec, default)
        raise AssertionError(f"{key}: SPECIAL keys are read by parse()")

    def _path(self, key: str, spec: KeySpec, default: Path | None, base: Path) -> Path | None:
        value = self.raw(key)
        if value == "" and not spec.allow_empty:
            raise self.error(key, value, spec.accepted())
        if value is None or value == "":
            return None if default is None else _resolve(base, str(default))
        if "\x00" in value:
            raise self.error(key, value, spec.accepted())
        return _resolve(base, value)

    def _ae(self, key: str, spec: KeySpec, default: str) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if spec.allow_empty and value == "":
            return ""
        try:
            return validate_ae_title(value)
        except ValueError:
            raise self.error(key, value, _AE_ACCEPTED) from None

    def _host(self, key: str, spec: KeySpec, default: str) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if value == "" and spec.allow_empty:
            return ""
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
            return value
        raise self.error(key, value, spec.accepted())

    def check_unknown(self, known: set[str]) -> None:
        for key in self.items:
            if key not in known:
                raise ConfigError(
                    f"{self.source}: [{self.name}] unknown key {key!r}; "
                    f"accepted keys: {', '.join(sorted(known))}"
                )


def _to_bool(v: str) -> bool:
    low = v.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(v)


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


class _IniParser(configparser.ConfigParser):
    """configparser with both delimiters, where ``=`` wins over an earlier ``:``.

    ``key: value`` still loads (configparser's default, which the original
    tool's config.ini could use), and ``tag:StudyDescription = *QA*`` is the
    key ``tag:StudyDescription``: a colon separates key and value only when no
    ``=`` follows it on the line.
    """

    OPTCRE = re.compile(r"(?P<option>.*?)\s*(?P<vi>=|:(?![^=]*=))\s*(?P<value>.*)$")


def _read_parser(text: str, source: str) -> configparser.ConfigParser:
    parser = _IniParser(
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
    by_lower = {s.lower(): s for s in SECTIONS if s not in (DESTINATION_SECTION, ROUTE_SECTION)}
    for name in parser.sections():
        prefix = next(
            (p for p in (DESTINATION_PREFIX, ROUTE_PREFIX) if name.lower().startswith(p.lower())),
            None,
        )
        if prefix is not None:
            if not name.startswith(prefix):
                raise ConfigError(f"{source}: section [{name}] must be spelled [{prefix}...]")
            if not name[len(prefix) :].strip():
                raise ConfigError(f"{source}: section [{name}] needs a name: [{prefix}NAME]")
            continue
        if name.lower() not in by_lower:
            raise ConfigError(
                f"{source}: unknown section [{name}]; accepted sections: {', '.join(SECTIONS)}"
            )
        if name != by_lower[name.lower()]:
            raise ConfigError(
                f"{source}: section [{name}] must be spelled [{by_lower[name.lower()]}]"
            )
    return parser


def _spec(cls: type, name: str) -> KeySpec:
    return _declared(cls, name)[1]


def _declared(cls: type, name: str) -> tuple[Field[Any], KeySpec]:
    for f, spec in declared_keys(cls):
        if f.name == name:
            return f, spec
    raise KeyError(name)


def _build(
    cls: type[T],
    sections: Mapping[str, _Section],
    base: Path,
    special: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Read every declared key of ``cls`` (SPECIAL ones come in ``special``) and build it."""
    values: dict[str, Any] = dict(special)
    for f, spec in declared_keys(cls):
        if spec.kind is Kind.SPECIAL:
            continue
        default = (defaults or {}).get(f.name, f.default)
        values[f.name] = sections[spec.section].read(f.name, spec, default, base)
    return cls(**values)


def _trusted_titles(sec: _Section, source: str) -> tuple[str, ...]:
    trusted: list[str] = []
    for item in (sec.raw("trusted_ae_titles") or "").split(","):
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
    return tuple(trusted)


def _ae_keyed(parser: configparser.ConfigParser, name: str, source: str) -> list[tuple[str, str]]:
    """Return the (AE title, value) items of a free-form section, titles validated."""
    found = []
    for key, value in parser.items(name) if parser.has_section(name) else []:
        try:
            found.append((validate_ae_title(key), value.strip()))
        except ValueError:
            raise ConfigError(
                f"{source}: [{name}] {key!r} is not a valid AE title ({_AE_ACCEPTED})"
            ) from None
    return found


def _send_order(fw: _Section) -> tuple[str, ...]:
    order_raw = fw.raw("send_order")
    if not order_raw:
        return DEFAULT_SEND_ORDER
    tokens = tuple(t.strip().upper() for t in order_raw.split(",") if t.strip())
    if (
        not tokens
        or any(t not in _SEND_ORDER_TOKENS for t in tokens)
        or len(set(tokens)) != len(tokens)
    ):
        raise fw.error(
            "send_order", order_raw, "a comma-separated order of " + ", ".join(DEFAULT_SEND_ORDER)
        )
    return tokens + tuple(t for t in DEFAULT_SEND_ORDER if t not in tokens)


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
        The validated configuration; absent keys take their declared defaults.

    Raises
    ------
    ConfigError
        On an unknown section or key, or a value outside its accepted range.
    """
    parser = _read_parser(text, source)
    sections = {
        name: _Section(source, name, dict(parser.items(name)) if parser.has_section(name) else {})
        for name in SECTIONS
    }
    net, dirs, sec = sections["Network"], sections["Directories"], sections["Security"]

    processes_raw = net.raw("receiver_processes")
    processes = (
        0
        if (processes_raw or "auto").lower() == "auto"
        else net.get(
            "receiver_processes",
            0,
            lambda v: _bounded_int(v, 1, 64),
            "auto or a whole number from 1 to 64",
        )
    )
    layout = dirs.raw("folder_layout")
    layout = DEFAULT_LAYOUT if layout is None else layout
    _check_layout(dirs, layout)
    dest_field, dest_spec = _declared(ReceiverConfig, "destination_dir")
    destination = dirs.read("destination_dir", dest_spec, dest_field.default, base_dir)
    mappings = []
    for aet, value in _ae_keyed(parser, "AE_Mappings", source):
        if not value or "\x00" in value:
            raise sections["AE_Mappings"].error(
                aet, value, "a folder (absolute, UNC, or relative to destination_dir)"
            )
        mappings.append((aet, _resolve(destination, value)))
    hosts = []
    for aet, value in _ae_keyed(parser, "AE_Hosts", source):
        names = tuple(h.strip() for h in value.split(",") if h.strip())
        if not names:
            raise ConfigError(
                f"{source}: [AE_Hosts] {aet} is empty; accepted: comma-separated host names or addresses"
            )
        hosts.append((aet, names))
    destinations = _destinations(parser, source, base_dir)
    receiver = _build(
        ReceiverConfig,
        sections,
        base_dir,
        {
            "trusted_ae_titles": _trusted_titles(sec, source),
            "ae_mappings": tuple(mappings),
            "ae_hosts": tuple(hosts),
            "folder_layout": layout,
            "receiver_processes": processes,
            "destinations": destinations,
        },
    )
    if 0 < receiver.max_pdu_bytes < 4096:
        raise net.error("max_pdu_bytes", str(receiver.max_pdu_bytes), "0 or at least 4096")

    tools_sec = sections["Tools"]
    emf2sf_path = tools_sec.read("emf2sf_path", _spec(ToolsConfig, "emf2sf_path"), None, base_dir)
    conversion_raw = tools_sec.raw("enhanced_mr_conversion")
    if conversion_raw is None or conversion_raw == "":
        # The original's semantics: emf2sf when the path points at something usable.
        conversion = "emf2sf" if emf2sf_path is not None and emf2sf_path.exists() else "off"
    else:
        conversion = tools_sec.read(
            "enhanced_mr_conversion",
            replace(_spec(ToolsConfig, "enhanced_mr_conversion"), kind=Kind.CHOICE),
            "off",
            base_dir,
        )
    if conversion == "emf2sf" and emf2sf_path is None:
        raise tools_sec.error(
            "enhanced_mr_conversion", "emf2sf", "native or off when emf2sf_path is empty"
        )
    tools = _build(ToolsConfig, sections, base_dir, {"enhanced_mr_conversion": conversion})

    fw = sections["FolderWatcher"]
    forwarder = _build(
        ForwarderConfig,
        sections,
        base_dir,
        {"send_order": _send_order(fw)},
        defaults={"calling_aet": receiver.ae_title},
    )
    if bool(forwarder.target_ip) != bool(forwarder.target_aet):
        missing = "target_aet" if forwarder.target_ip else "target_ip"
        raise ConfigError(
            f"{source}: [FolderWatcher] {missing} is empty; set both target_aet and target_ip, "
            "or neither to disable forwarding"
        )

    tls = _build(TlsConfig, sections, base_dir, {})
    if tls.enabled and (tls.certificate is None or tls.private_key is None):
        raise ConfigError(f"{source}: [TLS] enabled = true needs certificate and private_key")
    forwarder = _forwarder_destinations(parser, source, forwarder, destinations, tls)
    receiver = with_commitment(receiver, forwarder)

    log_sec = sections["Logging"]
    level = log_sec.read(
        "pynetdicom_level",
        replace(_spec(LoggingConfig, "pynetdicom_level"), kind=Kind.CHOICE),
        "warning",
        base_dir,
    )
    logging_cfg = _build(LoggingConfig, sections, base_dir, {"pynetdicom_level": level.upper()})

    ledger = _build(LedgerConfig, sections, base_dir, {})
    web = _build(WebConfig, sections, base_dir, {})
    if web.https:
        web_cert = web.certificate or tls.certificate
        web_key = web.private_key or tls.private_key
        if web_cert is None or web_key is None:
            raise ConfigError(
                f"{source}: [Web] https = true needs certificate and private_key "
                "(in [Web], or in [TLS] to reuse the DICOM TLS certificate)"
            )
        web = replace(web, certificate=web_cert, private_key=web_key)

    audit = _build(AuditConfig, sections, base_dir, {})
    if audit.syslog and not re.fullmatch(
        r"(udp|tcp\+tls)://[A-Za-z0-9.:\[\]-]+:\d{1,5}", audit.syslog
    ):
        raise sections["Audit"].error(
            "syslog", audit.syslog, "udp://host:port or tcp+tls://host:port"
        )

    node = _build(
        NodeConfig,
        sections,
        base_dir,
        {
            "source": source,
            "receiver": receiver,
            "forwarder": forwarder,
            "tools": tools,
            "tls": tls,
            "logging": logging_cfg,
            "ledger": ledger,
            "web": web,
            "audit": audit,
            "destinations": destinations,
        },
    )
    known: dict[str, set[str]] = {name: set() for name in SECTIONS}
    for section, key, *_ in all_keys():
        known[section].add(key)
    for name, section_obj in sections.items():
        if name not in FREE_FORM_SECTIONS:
            section_obj.check_unknown(known[name])
    return node


def _destinations(
    parser: configparser.ConfigParser, source: str, base_dir: Path
) -> tuple[DestinationConfig, ...]:
    """Read every ``[Destination:NAME]`` section (keys as declared in :class:`DestinationConfig`)."""
    found: list[DestinationConfig] = []
    known = {f.name for f, _ in declared_keys(DestinationConfig)}
    for name in parser.sections():
        if not name.startswith(DESTINATION_PREFIX):
            continue
        sec = _Section(source, name, dict(parser.items(name)))
        sections = {DESTINATION_SECTION: sec}
        dest = _build(
            DestinationConfig, sections, base_dir, {"name": name[len(DESTINATION_PREFIX) :].strip()}
        )
        for key in ("ae_title", "host"):
            if not getattr(dest, key) and dest.name != DEFAULT_DESTINATION:
                raise ConfigError(f"{source}: [{name}] {key} is missing or empty; it is required")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", dest.name):
            raise ConfigError(
                f"{source}: [{name}] the name must be 1-64 letters, digits, '.', '_' or '-' "
                "(routes list names separated by commas; failed/<name>/ is a folder)"
            )
        sec.check_unknown(known)
        other = next((d for d in found if dest.ae_title and d.ae_title == dest.ae_title), None)
        if other is not None:
            raise ConfigError(
                f"{source}: [{name}] ae_title = {dest.ae_title} is already the AE title of "
                f"[Destination:{other.name}]; an AE title names one remote node (storage "
                "commitment reports are matched by it): give each node its own AE title"
            )
        found.append(dest)
    return tuple(found)


def _forwarder_destinations(
    parser: configparser.ConfigParser,
    source: str,
    forwarder: ForwarderConfig,
    named: tuple[DestinationConfig, ...],
    tls: TlsConfig,
) -> ForwarderConfig:
    """Return ``forwarder`` with its destinations (``default`` from target_*) and routes."""
    found = [d for d in named if d.name != DEFAULT_DESTINATION]
    section = next((d for d in named if d.name == DEFAULT_DESTINATION), None)
    if forwarder.has_target:
        if section is not None and (section.ae_title or section.host):
            raise ConfigError(
                f"{source}: [{DESTINATION_PREFIX}{DEFAULT_DESTINATION}] and [FolderWatcher] "
                "target_aet/target_ip both define the destination 'default'; keep one of them "
                "(a [Destination:default] without ae_title and host only adds keys to the target)"
            )
        # [Destination:default] without an address adds its other keys (storage_commitment...);
        # without one, a section describing the same node lends it its storage commitment keys
        twin = next(
            (
                d
                for d in named
                if d.storage_commitment
                and (d.ae_title, d.host, d.port)
                == (forwarder.target_aet, forwarder.target_ip, forwarder.target_port)
            ),
            None,
        )
        base = section or DestinationConfig(name=DEFAULT_DESTINATION)
        if section is None and twin is not None:
            base = replace(
                base,
                storage_commitment=True,
                commitment_timeout_s=twin.commitment_timeout_s,
                commitment_max_attempts=twin.commitment_max_attempts,
            )
        found.insert(
            0,
            replace(
                base,
                ae_title=forwarder.target_aet,
                host=forwarder.target_ip,
                port=forwarder.target_port,
                tls=(section is not None and section.tls) or tls.enabled,
                max_associations=(
                    section.max_associations
                    if section is not None and section.max_associations != 1
                    else forwarder.max_associations
                ),
            ),
        )
    elif section is not None:
        if not (section.ae_title and section.host):
            raise ConfigError(
                f"{source}: [{DESTINATION_PREFIX}{DEFAULT_DESTINATION}] needs ae_title and host "
                "(or [FolderWatcher] target_aet and target_ip)"
            )
        found.insert(0, section)
    for dest in found:
        if dest.tls and (tls.certificate is None or tls.private_key is None):
            raise ConfigError(
                f"{source}: [{DESTINATION_PREFIX}{dest.name}] tls = true needs [TLS] "
                "certificate and private_key"
            )
    routes = _routes(parser, source, {d.name for d in found})
    if (
        routes
        and forwarder.unrouted == "default"
        and not any(d.name == DEFAULT_DESTINATION for d in found)
    ):
        # unrouted files are parked: nothing else can happen to them
        forwarder = replace(forwarder, unrouted="park")
    return replace(forwarder, destinations=tuple(found), routes=routes)


def _items(raw: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in raw.split(",") if v.strip())


def _routes(
    parser: configparser.ConfigParser, source: str, known_destinations: set[str]
) -> tuple[RouteConfig, ...]:
    """Read every ``[Route:NAME]`` section, validating destinations, SOP classes and keywords."""
    found: list[RouteConfig] = []
    plain = {f.name for f, _ in declared_keys(RouteConfig)}
    for section in parser.sections():
        if not section.startswith(ROUTE_PREFIX):
            continue
        values: dict[str, tuple[str, ...]] = {}
        tags: list[tuple[str, tuple[str, ...]]] = []
        for key, raw in parser.items(section):
            items = _items(raw)
            where = f"{source}: [{section}] {key}"
            if key.lower().startswith("tag:"):
                keyword = key[4:].strip()
                if not _is_keyword(keyword):
                    raise ConfigError(
                        f"{where}: {keyword!r} is not a DICOM keyword (pydicom spelling, "
                        "e.g. tag:StudyDescription)"
                    )
                if not items:
                    raise ConfigError(f"{where} is empty; accepted: comma-separated globs")
                tags.append((keyword, items))
                continue
            if key.lower() not in plain:
                raise ConfigError(
                    f"{source}: [{section}] unknown key {key!r}; accepted keys: "
                    f"{', '.join(sorted(plain))}, tag:<Keyword>"
                )
            if items:  # an empty filter is no filter
                values[key.lower()] = items
        destinations = values.get("destinations", ())
        if not destinations:
            raise ConfigError(f"{source}: [{section}] destinations is missing; it is required")
        for name in destinations:
            if name not in known_destinations:
                known = ", ".join(sorted(known_destinations)) or "none defined"
                raise ConfigError(
                    f"{source}: [{section}] destinations: unknown destination {name!r} "
                    f"(known: {known}; 'default' comes from [FolderWatcher] target_*)"
                )
        sop_classes = []
        for value in values.get("sop_class", ()):
            uid = _sop_class_uid(value)
            if uid is None:
                raise ConfigError(
                    f"{source}: [{section}] sop_class {value!r} is neither a UID nor a SOP "
                    "class keyword (e.g. CTImageStorage, RTPlanStorage)"
                )
            sop_classes.append(uid)
        found.append(
            RouteConfig(
                name=section[len(ROUTE_PREFIX) :].strip(),
                destinations=tuple(dict.fromkeys(destinations)),
                calling_ae=values.get("calling_ae", ()),
                modality=tuple(m.upper() for m in values.get("modality", ())),
                sop_class=tuple(sop_classes),
                folder=values.get("folder", ()),
                tags=tuple(tags),
            )
        )
    return tuple(found)


def _is_keyword(keyword: str) -> bool:
    from pydicom.datadict import tag_for_keyword  # only when routes name tags

    return bool(keyword) and tag_for_keyword(keyword) is not None


def _sop_class_uid(value: str) -> str | None:
    """Return the UID of ``value`` (a UID, or a SOP class keyword), or None."""
    if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", value) and len(value) <= 64:
        return value
    from pydicom._uid_dict import UID_dictionary  # only when routes name SOP classes

    for uid, entry in UID_dictionary.items():
        if entry[4] == value and entry[1] == "SOP Class":
            return uid
    return None


def destination_for(
    destinations: tuple[DestinationConfig, ...], ae_title: str
) -> DestinationConfig | None:
    """Return the destination whose ``ae_title`` is ``ae_title`` (exact match), or None."""
    return next((d for d in destinations if d.ae_title == ae_title), None)


def _bounded_int(value: str, lo: int, hi: int) -> int:
    n = int(value, 10)
    if not lo <= n <= hi:
        raise ValueError(value)
    return n


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


# --------------------------------------------------------------------------- showing


def show_value(value: object, spec: KeySpec | None = None) -> str:
    """Return ``value`` as it is written in an INI file."""
    if spec is not None and spec.shown_default and spec.kind is Kind.SPECIAL and value == 0:
        return spec.shown_default
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def describe(config: NodeConfig) -> list[str]:
    """Return the effective configuration as INI lines, in the original's sections."""
    values: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for cls, reach in HOLDERS:
        obj = reach(config)
        for f, spec in declared_keys(cls):
            value = getattr(obj, f.name)
            if spec.section == "AE_Mappings":
                values[spec.section] += [f"{aet} = {folder}" for aet, folder in value]
            elif spec.section == "AE_Hosts":
                values[spec.section] += [f"{aet} = {', '.join(names)}" for aet, names in value]
            else:
                values[spec.section].append(f"{f.name} = {show_value(value, spec)}")
    lines = [f"# effective configuration, source: {config.source}"]
    for name in SECTIONS:
        if name == DESTINATION_SECTION:
            fw = config.forwarder
            default = fw.destination(DEFAULT_DESTINATION)
            if default is not None and not any(d.name == default.name for d in config.destinations):
                lines.append(
                    f"# destination {DEFAULT_DESTINATION} = {default.address} "
                    "(from [FolderWatcher] target_*)"
                )
            for dest in config.destinations:
                lines.append(f"[{DESTINATION_PREFIX}{dest.name}]")
                lines += [
                    f"{f.name} = {show_value(getattr(dest, f.name), spec)}"
                    for f, spec in declared_keys(DestinationConfig)
                ]
            used = {d.name for d in fw.routed_destinations()} if fw.forwards else set()
            for dest in fw.all_destinations():
                lines.append(
                    f"# forwarder destination {dest.name}: {dest.address}"
                    + (" (tls)" if dest.tls else "")
                    + ("" if dest.name in used else " (no route sends to it)")
                )
            continue
        if name == ROUTE_SECTION:
            for route in config.forwarder.routes:
                lines.append(f"[{ROUTE_PREFIX}{route.name}]")
                lines += [
                    f"{f.name} = {show_value(getattr(route, f.name), spec)}"
                    for f, spec in declared_keys(RouteConfig)
                ]
                lines += [f"tag:{kw} = {', '.join(globs)}" for kw, globs in route.tags]
            if config.forwarder.routes:
                lines.append(f"# files no route matches: {config.forwarder.unrouted}")
            continue
        lines += [f"[{name}]", *values[name]]
    return lines


def default_text(f: Field[Any], spec: KeySpec) -> str:
    """Return a key's default as written in an INI file (or as documented)."""
    if spec.shown_default is not None:
        return spec.shown_default
    if spec.section in FREE_FORM_SECTIONS:
        return "(none)"
    if isinstance(f.default, Path):
        return f.default.as_posix()
    return show_value(f.default, spec)


def reference_table() -> list[str]:
    """Return the README's Markdown table of every key: section, key, default, meaning."""
    lines = ["| section | key | default | meaning |", "|---|---|---|---|"]
    for section, key, f, spec, _cls in all_keys():
        name = "*AE title*" if section in FREE_FORM_SECTIONS else f"`{key}`"
        default = default_text(f, spec)
        shown = f"`{default}`" if default and not default.startswith("(") else default or "(empty)"
        meaning = spec.help.replace("|", "\\|")
        lines.append(f"| [{section}] | {name} | {shown} | {meaning} |")
    return lines


if __name__ == "__main__":  # ``python -m dicomnode.config``: the README's key table
    print("\n".join(reference_table()))
