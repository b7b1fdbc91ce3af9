"""``make bench``: dicomnode side by side with DCMTK on loopback, in one run.

Method (see ``bench/README.md``): for every measurement a fresh receiver is
started on a free 127.0.0.1 port; the harness waits until it is ready (port in
LISTEN state, and for dicomnode the ``LISTENING`` log line of all receiver
processes), runs ``sync``, then times sender start to sender exit, counts the
stored files and stops the receiver. Nothing outside that interval is timed.
Repetitions are interleaved (rep 1 of every case, then rep 2, ...); tables show
medians of complete transfers, and **ratio** is the median over reps of this
case's MB/s divided by the DCMTK pair's MB/s *in the same rep*.

Sections:

* RECEIVE: DCMTK ``storescu +sd +r`` (one association) -> dicomnode,
  against storescu -> DCMTK ``storescp``.
* FORWARD: ``python -m dicomnode send`` -> storescp, against storescu -> storescp.
* MEMORY: one ~1 GB RT Dose received by and sent from dicomnode; peak RSS is
  VmHWM of every receiver process (largest one and sum) and wait4's ru_maxrss
  of the sender.
* CONCURRENCY: 4 storescu at once (the files split in 4) -> dicomnode, against
  1 storescu with all files -> dicomnode; ratio = aggregate MB/s of 4 / of 1.
  The same two transfers to ``storescp --fork`` (one process per association,
  no fsync) are the anchor: how far this machine lets 4 senders scale at all.
* DELAYED: ``dicomnode send`` with ``max_associations = 4`` over a link with
  5 ms added each way (tc netem in a network namespace, else
  ``bench/delay_proxy.py``), against storescu over the same link, both to
  ``storescp --fork``.

``TCP_NODELAY=1`` is exported to DCMTK (Debian's DCMTK leaves Nagle on, which
costs ~40 ms per C-STORE on loopback); ``--nagle-default`` turns that off.
Results go to ``bench/out/<UTC timestamp>/results.md`` and ``results.jsonl``.
Exit status: 0 when every measurement was complete, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_data  # sibling script, found through the sys.path entry above

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent
NODE_AET: Final = "DICOMNODE"
DCMTK_AET: Final = "DCMTKSCP"
SCU_AET: Final = "BENCHSCU"
#: RECEIVE rows that anchor dicomnode's figure: the best durable peer and the disk.
NODE_RECEIVE_CASE: Final = "storescu->dicomnode"
ORTHANC_CASE: Final = "storescu->orthanc (sync on)"
#: The concurrency anchor: DCMTK's own receiver, one process per association.
FORK_ONE_CASE: Final = "1 storescu->storescp --fork (anchor)"
FORK_FOUR_CASE: Final = "4 storescu->storescp --fork (anchor)"
DURABLE_CASE: Final = "durable limit (tcp+write+fsync, no DICOM)"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
MB: Final = 1_000_000

#: Targets (issues 7 and 18): (section, dataset) -> (what, minimum ratio or maximum MB).
TARGETS: Final[dict[tuple[str, str], tuple[str, float]]] = {
    ("RECEIVE", "ct512"): ("ratio", 0.75),  # issue 18 (issue 7: 0.40)
    ("RECEIVE", "small"): ("ratio", 0.75),  # issue 18 (issue 7: 0.30)
    ("FORWARD", "ct512"): ("ratio", 0.70),  # issue 18 (issue 7: 0.35)
    ("FORWARD", "small"): ("ratio", 0.70),  # issue 18 (issue 7: 0.28)
    ("MEMORY", "big"): ("rss_mb", 120.0),
    ("CONCURRENCY", "small"): ("ratio", 2.0),  # issue 18 (issue 7: 1.5)
    ("CONCURRENCY", "ct512"): ("ratio", 1.6),  # issue 18
    # issue 16: N = 4 associations over a 10 ms round trip, against storescu over the same link
    ("DELAYED", "small"): ("ratio", 3.0),
}


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Measurement:
    """One timed transfer (one row of results.jsonl)."""

    section: str
    dataset: str
    case: str
    rep: int
    baseline: bool
    files_expected: int
    files_stored: int
    input_bytes: int
    wall_s: float = 0.0
    sender_rc: list[int] = field(default_factory=list)
    sender_cpu_s: float = 0.0
    sender_rss_mb: float = 0.0
    receiver_cpu_s: float = 0.0
    receiver_rss_mb: float = 0.0
    receiver_rss_sum_mb: float = 0.0
    receiver_processes: int = 0
    load_1min: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        """Return True when every file arrived and every sender exited 0."""
        return (
            not self.error
            and self.files_stored == self.files_expected
            and all(rc == 0 for rc in self.sender_rc)
        )

    @property
    def mb_per_s(self) -> float:
        """Return input MB (10^6 bytes) per wall second."""
        return self.input_bytes / MB / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def files_per_s(self) -> float:
        """Return files per wall second."""
        return self.files_expected / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Options:
    """Settings of one bench run (from the command line)."""

    reps: int
    datasets: tuple[str, ...]
    sections: tuple[str, ...]
    conc_datasets: tuple[str, ...]
    quick: bool
    out: Path
    data: Path
    nodelay: bool
    keep: bool
    python: str
    probe: bool = False
    delayed_dataset: str = "small"
    delay_ms: float = 5.0
    delayed_associations: int = 4


@dataclass(frozen=True, slots=True)
class Tools:
    """Paths of the DCMTK programs."""

    storescu: str
    storescp: str
    orthanc: str | None = None


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_listening(port: int, pid: int | None = None) -> bool:
    """Return True when some socket is in LISTEN state on ``port`` (Linux /proc).

    With ``pid``, the tables of that process's network namespace are read.
    """
    wanted = f":{port:04X}"
    base = f"/proc/{pid}/net" if pid is not None else "/proc/net"
    for table in (f"{base}/tcp", f"{base}/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[1].endswith(wanted) and cols[3] == "0A":
                    return True
    return False


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and all its descendants that are alive now."""
    kids = _children_map()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(kids.get(current, []))
    return found


def cpu_ticks(pid: int) -> int:
    """Return the CPU time of ``pid`` and of its children it has reaped, in clock ticks.

    utime + stime + cutime + cstime (0 when gone): ``storescp --fork`` serves each
    association in a child process, counted once the child has ended and been reaped.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(value) for value in fields[11:15])


def peak_rss_mb(pid: int) -> float:
    """Return VmHWM of ``pid`` in MB (10^6 bytes; 0 when gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return 0.0


class PeakSampler:
    """Poll VmHWM of some processes until stopped (cheap: one /proc read each).

    ``wait4``'s ru_maxrss is useless for a child of this (large) Python process:
    it keeps the high-water mark of the forked image from before ``exec``.
    VmHWM belongs to the program actually running, so it is sampled instead.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.pids: list[int] = []
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        """Start sampling in a background thread."""
        self._thread.start()

    def _sample(self) -> None:
        for pid in list(self.pids):
            self.peak_mb = max(self.peak_mb, peak_rss_mb(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> float:
        """Stop sampling and return the largest VmHWM seen, in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak_mb


@dataclass(slots=True)
class SenderResult:
    """Exit codes and resource use of one or more senders run at once."""

    wall_s: float
    returncodes: list[int]
    cpu_s: float
    max_rss_mb: float


def run_senders(
    commands: Sequence[list[str]], env: dict[str, str], logs: Sequence[Path], timeout_s: float
) -> SenderResult:
    """Start ``commands`` together; time start to the last exit; kill them after ``timeout_s``."""
    handles: list[IO[bytes]] = [log.open("wb") for log in logs]
    procs: list[subprocess.Popen[bytes]] = []
    timer: threading.Timer | None = None
    sampler = PeakSampler()
    try:
        started = time.perf_counter()
        for cmd, fh in zip(commands, handles, strict=True):
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
            sampler.pids.append(procs[-1].pid)
        sampler.start()

        def kill_all() -> None:
            for proc in procs:
                with contextlib.suppress(OSError):
                    proc.kill()

        timer = threading.Timer(timeout_s, kill_all)
        timer.start()
        codes: list[int] = []
        cpu = 0.0
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            codes.append(proc.returncode)
            cpu += usage.ru_utime + usage.ru_stime
        wall = time.perf_counter() - started
    finally:
        rss = sampler.stop() if sampler._thread.is_alive() else 0.0
        if timer is not None:
            timer.cancel()
        for fh in handles:
            fh.close()
    return SenderResult(wall, codes, cpu, rss)


class Receiver:
    """A receiver process under test: start, wait until ready, sample, stop."""

    name = "receiver"

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.env = env
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._fh: IO[bytes] | None = None
        #: Put in front of the command (``ip netns exec NAME`` for the DELAYED link).
        self.prefix: list[str] = []

    def command(self) -> list[str]:
        """Return the command line of the receiver."""
        raise NotImplementedError

    def is_ready(self) -> bool:
        """Return True when the receiver accepts associations."""
        if self.prefix and self.proc is not None:
            return is_listening(self.port, self.proc.pid)  # its own network namespace
        return is_listening(self.port)

    def stored_files(self) -> int:
        """Return the number of complete objects stored so far."""
        raise NotImplementedError

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the receiver and wait until it is ready (not timed)."""
        self.store.mkdir(parents=True, exist_ok=True)
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command()], env=self.env, stdout=self._fh, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: see {self.log}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s:g} s: see {self.log}")
            time.sleep(0.02)

    def pids(self) -> list[int]:
        """Return the receiver process and its descendants."""
        return process_tree(self.proc.pid) if self.proc is not None else []

    def cpu_s(self, pids: Sequence[int]) -> float:
        """Return the CPU seconds used so far by ``pids``."""
        return sum(cpu_ticks(p) for p in pids) / CLOCK_TICKS

    def wait_stored(self, expected: int, timeout_s: float = 3.0) -> int:
        """Poll the stored-file count until it reaches ``expected`` or time runs out."""
        deadline = time.monotonic() + timeout_s
        count = self.stored_files()
        while count < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.stored_files()
        return count

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait, SIGKILL if needed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._fh is not None:
            self._fh.close()


def _count_files(root: Path) -> int:
    """Count regular files below ``root``, leaving out in-progress ``.part`` files."""
    return sum(1 for _, _, names in os.walk(root) for name in names if not name.endswith(".part"))


class DcmtkReceiver(Receiver):
    """DCMTK storescp writing into ``store/`` (its default options)."""

    name = "storescp"

    def __init__(
        self, workdir: Path, env: dict[str, str], tools: Tools, fork: bool = False
    ) -> None:
        super().__init__(workdir, env)
        self.tools = tools
        self.fork = fork

    def command(self) -> list[str]:
        """Return the storescp command line (``--fork``: one process per association)."""
        fork = ["--fork"] if self.fork else []
        return [
            self.tools.storescp,
            *fork,
            "-aet",
            DCMTK_AET,
            "-od",
            str(self.store),
            str(self.port),
        ]

    def stored_files(self) -> int:
        """Count the files storescp wrote."""
        return _count_files(self.store)


class DelayedLink(Receiver):
    """A receiver behind ``bench/delay_proxy.py``: senders connect to the proxy's port."""

    name = "delay-proxy"

    def __init__(self, inner: Receiver, python: str, delay_ms: float) -> None:
        super().__init__(inner.workdir, inner.env)
        self.inner = inner
        self.python = python
        self.delay_ms = delay_ms

    def command(self) -> list[str]:
        """Return the proxy's command line: this port -> the receiver's, delayed."""
        script = str(BENCH_DIR / "delay_proxy.py")
        return [
            self.python,
            script,
            str(self.port),
            str(self.inner.port),
            "--delay-ms",
            f"{self.delay_ms:g}",
        ]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the receiver, then the proxy in front of it."""
        self.inner.start(timeout_s)
        super().start(timeout_s)

    def pids(self) -> list[int]:
        """Return the receiver's processes (the proxy is the link, not the receiver)."""
        return self.inner.pids()

    def stored_files(self) -> int:
        """Return the receiver's count."""
        return self.inner.stored_files()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the proxy, then the receiver."""
        super().stop(timeout_s)
        self.inner.stop(timeout_s)


class NodeReceiver(Receiver):
    """``python -m dicomnode --no-watcher`` with a generated INI file."""

    name = "dicomnode"

    def __init__(self, workdir: Path, env: dict[str, str], python: str) -> None:
        super().__init__(workdir, env)
        self.python = python
        self.config = workdir / "receiver.ini"

    def command(self) -> list[str]:
        """Write the INI file and return the node's command line."""
        self.config.write_text(
            "[General]\n"
            f"ae_title = {NODE_AET}\n"
            "[Network]\n"
            "server_ip = 127.0.0.1\n"
            f"receive_port = {self.port}\n"
            "[Directories]\n"
            f"destination_dir = {self.store}\n"
            "min_free_space_mb = 100\n"
            "[Security]\n"
            "trusted_ae_titles = *\n"
            "[Logging]\n"
            "verbose = false\n",
            encoding="utf-8",
        )
        return [self.python, "-m", "dicomnode", "--config", str(self.config), "--no-watcher"]

    def is_ready(self) -> bool:
        """Ready once the port listens and the node logged LISTENING (all processes up)."""
        if not is_listening(self.port):
            return False
        if self._fh is not None:
            self._fh.flush()
        return b"LISTENING" in self.log.read_bytes()

    def stored_files(self) -> int:
        """Count objects in their final place (temp and errors folders excluded)."""
        return _count_files(self.store / "incoming")


class RawProbeReceiver(Receiver):
    """``bench/raw_scp.py``: the no-pynetdicom ceiling probe (``--with-probe``)."""

    name = "raw-scp"

    def __init__(
        self, workdir: Path, env: dict[str, str], python: str, dicomnode_store: bool
    ) -> None:
        super().__init__(workdir, env)
        self.python = python
        self.dicomnode_store = dicomnode_store

    def command(self) -> list[str]:
        """Return the probe's command line."""
        extra = ["--dicomnode-store"] if self.dicomnode_store else []
        script = str(BENCH_DIR / "raw_scp.py")
        return [self.python, script, str(self.port), str(self.store), *extra]

    def is_ready(self) -> bool:
        """Ready once the port listens and the probe printed LISTENING."""
        if self._fh is not None:
            self._fh.flush()
        return is_listening(self.port) and b"LISTENING" in self.log.read_bytes()

    def stored_files(self) -> int:
        """Count stored objects (the probe renames into ``store/`` itself)."""
        return _count_files(self.store)


class OrthancReceiver(Receiver):
    """Orthanc (Debian's package) with a throw-away configuration: the durable peer anchor.

    Orthanc syncs its storage area by default (``SyncStorageArea``), so it pays the same
    kind of fsync per object as dicomnode. Stored objects are counted through its REST API.
    """

    name = "orthanc"

    def __init__(self, workdir: Path, env: dict[str, str], exe: str) -> None:
        super().__init__(workdir, env)
        self.exe = exe
        self.http_port = free_port()

    def command(self) -> list[str]:
        """Write the Orthanc configuration and return its command line."""
        cfg = {
            "Name": "bench",
            "DicomAet": NODE_AET,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.store / "storage"),
            "IndexDirectory": str(self.store / "index"),
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
        }
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(cfg), encoding="utf-8")
        return [self.exe, str(config)]

    def is_ready(self) -> bool:
        """Ready once both the DICOM and the REST port listen."""
        return is_listening(self.port) and is_listening(self.http_port)

    def stored_files(self) -> int:
        """Return Orthanc's instance count (REST ``/statistics``)."""
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return int(json.load(answer)["CountInstances"])
        except (OSError, ValueError, KeyError):
            return 0


class DurableLimitReceiver(Receiver):
    """``bench/durable_limit.py serve``: TCP + write + fsync + rename + folder fsync, no DICOM."""

    name = "durable-limit"

    def __init__(self, workdir: Path, env: dict[str, str], python: str) -> None:
        super().__init__(workdir, env)
        self.python = python

    def command(self) -> list[str]:
        """Return the probe server's command line."""
        script = str(BENCH_DIR / "durable_limit.py")
        return [self.python, script, "serve", str(self.port), str(self.store)]

    def stored_files(self) -> int:
        """Count objects renamed into place."""
        return sum(1 for p in self.store.iterdir() if p.suffix == ".obj")


# --------------------------------------------------------------------------- cases


def storescu_cmd(tools: Tools, port: int, called: str, inputs: Sequence[Path]) -> list[str]:
    """Return one storescu association sending ``inputs`` (folders scanned recursively)."""
    scan = ["+sd", "+r"] if any(p.is_dir() for p in inputs) else []
    return [
        tools.storescu,
        "-aet",
        SCU_AET,
        "-aec",
        called,
        *scan,
        "127.0.0.1",
        str(port),
        *(str(p) for p in inputs),
    ]


def node_send_cmd(python: str, config: Path, port: int, called: str, folder: Path) -> list[str]:
    """Return ``python -m dicomnode send`` of one folder to 127.0.0.1:port."""
    return [
        python,
        "-m",
        "dicomnode",
        "--config",
        str(config),
        "send",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--call",
        called,
        "--aet",
        NODE_AET,
    ]


def link_copy(src: Path, dst: Path) -> Path:
    """Hard-link the tree ``src`` to ``dst`` (``send`` deletes what it delivered)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return dst


def split_files(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """Split ``files`` into ``parts`` contiguous chunks of near-equal length."""
    size, extra = divmod(len(files), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(files[start:end]))
        start = end
    return [c for c in chunks if c]


def compile_package(python: str) -> None:
    """Byte-compile dicomnode's modules for ``python``, as ``pip install`` does.

    A shell with ``PYTHONDONTWRITEBYTECODE`` set (some CI and agent shells) would
    otherwise make every ``dicomnode send`` compile the package from source
    (~0.1 s of CPU), which an installed node never does.
    """
    code = "import dicomnode, os; print(os.path.dirname(dicomnode.__file__))"
    found = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    folder = found.stdout.strip()
    if found.returncode == 0 and folder:
        subprocess.run([python, "-m", "compileall", "-q", folder], capture_output=True, check=False)


def forwarder_available(python: str) -> bool:
    """Return True when ``dicomnode send`` can run (its forwarder imports cleanly)."""
    check = [python, "-c", "from dicomnode.forwarder import send_paths"]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


@dataclass(frozen=True, slots=True)
class Dataset:
    """A generated dataset: folder, files and total size."""

    name: str
    folder: Path
    files: tuple[Path, ...]
    total_bytes: int


def netem_namespace(delay_ms: float) -> tuple[str | None, str]:
    """Create a network namespace whose loopback delays every packet by ``delay_ms``.

    Returns ``(name, description)``, or ``(None, why not)`` when ``tc netem`` cannot
    be used here (needs root, iproute2 and the kernel's ``sch_netem``). Both the
    receiver and the senders then run inside it (``ip netns exec``) on its 127.0.0.1,
    so each direction is delayed once: ``2 * delay_ms`` round trip.
    """
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return None, "needs root and iproute2 (ip, tc)"
    name = f"dnbench{os.getpid()}"

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=False)

    made = run("ip", "netns", "add", name)
    if made.returncode != 0:
        return None, f"ip netns add failed: {made.stderr.strip()}"
    netem = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", f"{delay_ms:g}ms"]
    steps = (
        ("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"),
        ("ip", "netns", "exec", name, *netem),
    )
    for step in steps:
        done = run(*step)
        if done.returncode != 0:
            run("ip", "netns", "del", name)
            why = done.stderr.strip() or f"exit {done.returncode}"
            return None, f"`{' '.join(step[4:])}` failed: {why}"
    return name, (
        f"tc netem delay {delay_ms:g} ms on the loopback of network namespace {name} "
        f"({2 * delay_ms:g} ms round trip)"
    )


def remove_namespace(name: str | None) -> None:
    """Delete the namespace made by :func:`netem_namespace` (nothing when None)."""
    if name is not None:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


#: A finished measurement's work folder with at most this many files is removed at
#: once; larger ones stay until the end of the run (see Bench._finish).
_REMOVE_AT_ONCE_MAX_FILES: Final = 16


class Bench:
    """Runs the cases of one ``make bench`` and collects :class:`Measurement` rows."""

    def __init__(self, opts: Options, tools: Tools, log: Callable[[str], None]) -> None:
        self.opts = opts
        self.tools = tools
        self.say = log
        self.work = opts.out / "work"
        self.results: list[Measurement] = []
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        if opts.nodelay:
            self.env["TCP_NODELAY"] = "1"
        else:
            self.env.pop("TCP_NODELAY", None)
        self._serial = 0
        #: Work folders of finished measurements with many files, removed at the end.
        self._spent: list[Path] = []
        compile_package(opts.python)
        #: The DELAYED link: a netem namespace, or None for the userspace delay line.
        self.netns: str | None = None
        self.link_note = ""
        self.can_send = forwarder_available(opts.python)
        if not self.can_send:
            log("FORWARD: not available (dicomnode.forwarder.send_paths cannot be imported)")

    def _workdir(self, label: str) -> Path:
        self._serial += 1
        slug = "".join(c if c.isalnum() else "-" for c in label)
        path = self.work / f"{self._serial:03d}-{slug}"
        path.mkdir(parents=True)
        return path

    def _timeout(self, data: Dataset) -> float:
        return 120.0 + data.total_bytes / (2 * MB)

    def measure(
        self,
        section: str,
        data: Dataset,
        case: str,
        rep: int,
        receiver: Callable[[Path], Receiver],
        senders: Callable[[Path, Receiver], list[list[str]]],
        baseline: bool = False,
    ) -> Measurement:
        """Run one transfer with a fresh receiver and record it."""
        workdir = self._workdir(f"{section.lower()}-{data.name}-{case}-r{rep}")
        row = Measurement(
            section, data.name, case, rep, baseline, len(data.files), 0, data.total_bytes
        )
        recv = receiver(workdir)
        try:
            recv.start()
            commands = senders(workdir, recv)
            pids = recv.pids()
            row.receiver_processes = len(pids)
            os.sync()
            row.load_1min = os.getloadavg()[0]
            cpu_before = recv.cpu_s(pids)
            logs = [workdir / f"sender-{i}.log" for i in range(len(commands))]
            result = run_senders(commands, self.env, logs, self._timeout(data))
            row.receiver_cpu_s = recv.cpu_s(pids) - cpu_before
            rss = [peak_rss_mb(p) for p in recv.pids()]
            row.receiver_rss_mb = max(rss, default=0.0)
            row.receiver_rss_sum_mb = sum(rss)
            row.wall_s = result.wall_s
            row.sender_rc = result.returncodes
            row.sender_cpu_s = result.cpu_s
            row.sender_rss_mb = result.max_rss_mb
            row.files_stored = recv.wait_stored(row.files_expected)
        except (OSError, RuntimeError) as exc:
            row.error = str(exc)
        finally:
            recv.stop()
        self._finish(row, workdir)
        return row

    def _finish(self, row: Measurement, workdir: Path) -> None:
        """Record ``row``; remove its work folder now (few files) or at the end of the run.

        Thousands of files freed just before a measurement slow the next one's
        file creation for about half a minute on ext4 without a journal (the inode
        allocator reads and skips every inode freed in the last ~30 s), by a
        different amount for each receiver; so the received files stay until the
        run ends, and only folders of a few (large) files go at once.
        """
        self.results.append(row)
        verdict = "ok" if row.ok else f"FAILED ({row.files_stored}/{row.files_expected} stored"
        if not row.ok:
            verdict += (
                f", rc={row.sender_rc}{', ' + row.error if row.error else ''}; see {workdir})"
            )
        self.say(
            f"  {row.section:<11} {row.dataset:<6} {row.case:<26} rep {row.rep}: "
            f"{row.wall_s:7.3f} s {row.mb_per_s:8.1f} MB/s {row.files_per_s:7.0f} files/s "
            f"recv RSS {row.receiver_rss_mb:5.0f} MB  {verdict}"
        )
        if row.ok and not self.opts.keep:
            if row.files_expected > _REMOVE_AT_ONCE_MAX_FILES:
                self._spent.append(workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    def remove_spent(self) -> None:
        """Remove the work folders kept until the end of the run (see :meth:`_finish`)."""
        for workdir in self._spent:
            shutil.rmtree(workdir, ignore_errors=True)
        self._spent.clear()

    # -- receivers and senders -------------------------------------------------------

    def dcmtk_receiver(self, workdir: Path) -> Receiver:
        """Return a storescp receiver in ``workdir``."""
        return DcmtkReceiver(workdir, self.env, self.tools)

    def node_receiver(self, workdir: Path) -> Receiver:
        """Return a dicomnode receiver in ``workdir``."""
        return NodeReceiver(workdir, self.env, self.opts.python)

    def forking_storescp_receiver(self, workdir: Path) -> Receiver:
        """Return DCMTK storescp with ``--fork`` (one process per association) in ``workdir``."""
        return DcmtkReceiver(workdir, self.env, self.tools, fork=True)

    def probe_receiver(self, workdir: Path) -> Receiver:
        """Return the raw-socket ceiling probe in ``workdir``."""
        return RawProbeReceiver(workdir, self.env, self.opts.python, dicomnode_store=False)

    def probe_node_store_receiver(self, workdir: Path) -> Receiver:
        """Return the raw-socket probe that stores with dicomnode's StoreHandler."""
        return RawProbeReceiver(workdir, self.env, self.opts.python, dicomnode_store=True)

    def orthanc_receiver(self, workdir: Path) -> Receiver:
        """Return an Orthanc receiver in ``workdir``."""
        assert self.tools.orthanc is not None
        return OrthancReceiver(workdir, self.env, self.tools.orthanc)

    def durable_limit_receiver(self, workdir: Path) -> Receiver:
        """Return the no-DICOM durable-limit server in ``workdir``."""
        return DurableLimitReceiver(workdir, self.env, self.opts.python)

    def durable_limit_send(self, data: Dataset) -> Callable[[Path, Receiver], list[list[str]]]:
        """Return a sender factory: the durable-limit client with the data folder."""
        script = str(BENCH_DIR / "durable_limit.py")
        return lambda _w, recv: [
            [self.opts.python, script, "send", "127.0.0.1", str(recv.port), str(data.folder)]
        ]

    def storescu_to(
        self, inputs: Sequence[Path], called: str
    ) -> Callable[[Path, Receiver], list[list[str]]]:
        """Return a sender factory: one storescu with ``inputs``."""
        return lambda _w, recv: [storescu_cmd(self.tools, recv.port, called, inputs)]

    def storescu_split(
        self, data: Dataset, parts: int
    ) -> Callable[[Path, Receiver], list[list[str]]]:
        """Return a sender factory: ``parts`` storescu, each with its share of the files."""
        chunks = split_files(data.files, parts)
        return lambda _w, recv: [
            storescu_cmd(self.tools, recv.port, NODE_AET, chunk) for chunk in chunks
        ]

    def probe_send(self, data: Dataset) -> Callable[[Path, Receiver], list[list[str]]]:
        """Return a sender factory: ``bench/raw_scu.py`` (ceiling probe) with the data folder."""
        script = str(BENCH_DIR / "raw_scu.py")
        return lambda _w, recv: [
            [self.opts.python, script, "127.0.0.1", str(recv.port), DCMTK_AET, str(data.folder)]
        ]

    def node_send(
        self, data: Dataset, associations: int = 1
    ) -> Callable[[Path, Receiver], list[list[str]]]:
        """Return a sender factory: ``dicomnode send`` of a hard-linked copy of the data."""

        def make(workdir: Path, recv: Receiver) -> list[list[str]]:
            outgoing = workdir / "outgoing"
            folder = link_copy(data.folder, outgoing / data.name)
            config = workdir / "sender.ini"
            config.write_text(
                f"[General]\nae_title = {NODE_AET}\n"
                f"[Directories]\ndestination_dir = {workdir / 'unused'}\n"
                "[Security]\ntrusted_ae_titles = *\n"
                f"[FolderWatcher]\nwatch_folder = {outgoing}\n"
                f"max_associations = {associations}\n"
                "[Logging]\nverbose = false\n",
                encoding="utf-8",
            )
            return [node_send_cmd(self.opts.python, config, recv.port, DCMTK_AET, folder)]

        return make

    # -- the delayed link --------------------------------------------------------------

    def setup_delayed_link(self) -> None:
        """Choose the DELAYED link: tc netem in a namespace, else the userspace delay line."""
        delay = self.opts.delay_ms
        self.netns, note = netem_namespace(delay)
        if self.netns is None:
            note = (
                f"tc netem not available here ({note}); the link is bench/delay_proxy.py, a "
                f"userspace delay line of {delay:g} ms each way ({2 * delay:g} ms round trip)"
            )
        self.link_note = note
        self.say(f"DELAYED link: {note}")

    def delayed_receiver(self, workdir: Path) -> Receiver:
        """Return storescp (one process per association) at the far end of the delayed link."""
        inner = DcmtkReceiver(workdir, self.env, self.tools, fork=True)
        if self.netns is not None:
            inner.prefix = ["ip", "netns", "exec", self.netns]
            return inner
        return DelayedLink(inner, self.opts.python, self.opts.delay_ms)

    def over_link(
        self, senders: Callable[[Path, Receiver], list[list[str]]]
    ) -> Callable[[Path, Receiver], list[list[str]]]:
        """Return ``senders`` run inside the netem namespace (unchanged for the delay line)."""
        if self.netns is None:
            return senders
        prefix = ["ip", "netns", "exec", self.netns]
        return lambda workdir, recv: [[*prefix, *cmd] for cmd in senders(workdir, recv)]

    def run_delayed(self, rep: int, data: Dataset) -> None:
        """storescu, then dicomnode send with N associations, over the same delayed link."""
        self.measure(
            "DELAYED",
            data,
            "dcmtk storescu->storescp",
            rep,
            self.delayed_receiver,
            self.over_link(self.storescu_to([data.folder], DCMTK_AET)),
            baseline=True,
        )
        if self.can_send:
            n = self.opts.delayed_associations
            self.measure(
                "DELAYED",
                data,
                f"dicomnode send N={n}->storescp",
                rep,
                self.delayed_receiver,
                self.over_link(self.node_send(data, n)),
            )

    # -- sections --------------------------------------------------------------------

    def run_rep(self, rep: int, datasets: dict[str, Dataset]) -> None:
        """Run every selected case once (one interleaved repetition)."""
        sections = self.opts.sections
        for name in self.opts.datasets:
            if name == "big":
                continue
            data = datasets[name]
            if "receive" in sections or "forward" in sections:
                self.measure(
                    "PAIR",
                    data,
                    "dcmtk storescu->storescp",
                    rep,
                    self.dcmtk_receiver,
                    self.storescu_to([data.folder], DCMTK_AET),
                    baseline=True,
                )
            if "receive" in sections:
                self.measure(
                    "RECEIVE",
                    data,
                    NODE_RECEIVE_CASE,
                    rep,
                    self.node_receiver,
                    self.storescu_to([data.folder], NODE_AET),
                )
            if "receive" in sections and self.tools.orthanc is not None:
                self.measure(
                    "RECEIVE",
                    data,
                    ORTHANC_CASE,
                    rep,
                    self.orthanc_receiver,
                    self.storescu_to([data.folder], NODE_AET),
                )
            if "receive" in sections:
                self.measure(
                    "RECEIVE",
                    data,
                    DURABLE_CASE,
                    rep,
                    self.durable_limit_receiver,
                    self.durable_limit_send(data),
                )
            if "receive" in sections and self.opts.probe:
                self.measure(
                    "RECEIVE",
                    data,
                    "storescu->raw-scp (probe)",
                    rep,
                    self.probe_receiver,
                    self.storescu_to([data.folder], NODE_AET),
                )
                self.measure(
                    "RECEIVE",
                    data,
                    "storescu->raw-scp+node-store (probe)",
                    rep,
                    self.probe_node_store_receiver,
                    self.storescu_to([data.folder], NODE_AET),
                )
            if "forward" in sections and self.can_send:
                self.measure(
                    "FORWARD",
                    data,
                    "dicomnode send->storescp",
                    rep,
                    self.dcmtk_receiver,
                    self.node_send(data),
                )
            if "forward" in sections and self.opts.probe:
                self.measure(
                    "FORWARD",
                    data,
                    "raw-scu (probe)->storescp",
                    rep,
                    self.dcmtk_receiver,
                    self.probe_send(data),
                )
        if "memory" in sections and "big" in datasets:
            self.run_memory(rep, datasets["big"])
        if "concurrency" in sections:
            for name in self.opts.conc_datasets:
                self.run_concurrency(rep, datasets[name])
        if "delayed" in sections:
            self.run_delayed(rep, datasets[self.opts.delayed_dataset])

    def run_memory(self, rep: int, data: Dataset) -> None:
        """Receive and send the ~1 GB object; the DCMTK pair gives the time ratio."""
        self.measure(
            "MEMORY",
            data,
            "dcmtk storescu->storescp",
            rep,
            self.dcmtk_receiver,
            self.storescu_to([data.folder], DCMTK_AET),
            baseline=True,
        )
        self.measure(
            "MEMORY",
            data,
            "storescu->dicomnode",
            rep,
            self.node_receiver,
            self.storescu_to([data.folder], NODE_AET),
        )
        if self.can_send:
            self.measure(
                "MEMORY",
                data,
                "dicomnode send->storescp",
                rep,
                self.dcmtk_receiver,
                self.node_send(data),
            )

    def run_concurrency(self, rep: int, data: Dataset) -> None:
        """1 storescu with all files, then 4 at once with a quarter each, -> dicomnode."""
        self.measure(
            "CONCURRENCY",
            data,
            "1 storescu->dicomnode",
            rep,
            self.node_receiver,
            self.storescu_split(data, 1),
            baseline=True,
        )
        self.measure(
            "CONCURRENCY",
            data,
            "4 storescu->dicomnode",
            rep,
            self.node_receiver,
            self.storescu_split(data, 4),
        )
        for case, parts in ((FORK_ONE_CASE, 1), (FORK_FOUR_CASE, 4)):
            self.measure(
                "CONCURRENCY",
                data,
                case,
                rep,
                self.forking_storescp_receiver,
                self.storescu_split(data, parts),
            )


# --------------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _baseline_of(row: Measurement, rows: Sequence[Measurement]) -> Measurement | None:
    """Return the same-rep baseline a row is compared with (None for baselines)."""
    if row.baseline:
        return None
    section = row.section if row.section in {"MEMORY", "CONCURRENCY", "DELAYED"} else "PAIR"
    for other in rows:
        if (
            other.baseline
            and other.section == section
            and other.dataset == row.dataset
            and other.rep == row.rep
        ):
            return other
    return None


def ratios(rows: Sequence[Measurement], case_rows: Sequence[Measurement]) -> list[float]:
    """Return this case's MB/s over its same-rep baseline's, for reps where both are ok."""
    found = []
    for row in case_rows:
        base = _baseline_of(row, rows)
        if row.ok and base is not None and base.ok and base.mb_per_s > 0:
            found.append(row.mb_per_s / base.mb_per_s)
    return found


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians of one (section, dataset, case) over its complete reps."""

    section: str
    dataset: str
    case: str
    baseline: bool
    ok: int
    reps: int
    wall_s: float
    files_per_s: float
    mb_per_s: float
    ratio: float
    sender_cpu_s: float
    receiver_cpu_s: float
    sender_rss_mb: float
    receiver_rss_mb: float
    receiver_rss_sum_mb: float


def summarise(rows: Sequence[Measurement]) -> list[Summary]:
    """Group rows by (section, dataset, case), in first-seen order, and take medians."""
    keys: dict[tuple[str, str, str], list[Measurement]] = {}
    for row in rows:
        keys.setdefault((row.section, row.dataset, row.case), []).append(row)
    out = []
    for (section, dataset, case), group in keys.items():
        good = [r for r in group if r.ok]
        baseline = group[0].baseline
        out.append(
            Summary(
                section,
                dataset,
                case,
                baseline,
                len(good),
                len(group),
                _median([r.wall_s for r in good]),
                _median([r.files_per_s for r in good]),
                _median([r.mb_per_s for r in good]),
                1.0 if baseline else _median(ratios(rows, group)),
                _median([r.sender_cpu_s for r in good]),
                _median([r.receiver_cpu_s for r in good]),
                max((r.sender_rss_mb for r in group), default=float("nan")),
                max((r.receiver_rss_mb for r in group), default=float("nan")),
                max((r.receiver_rss_sum_mb for r in group), default=float("nan")),
            )
        )
    return out


SECTION_TITLES: Final = {
    "RECEIVE": "RECEIVE: DCMTK storescu -> receiver (ratio vs storescu -> storescp)",
    "FORWARD": "FORWARD: sender -> DCMTK storescp (ratio vs storescu -> storescp)",
    "MEMORY": "MEMORY: one ~1 GB RT Dose (ratio vs storescu -> storescp)",
    "CONCURRENCY": "CONCURRENCY: storescu -> dicomnode (ratio = aggregate MB/s vs 1 sender)",
    "DELAYED": "DELAYED: forward over a link with added delay "
    "(ratio vs storescu -> storescp over the same link)",
}
HEADER: Final = (
    "| dataset | case | ok | wall s | files/s | MB/s | ratio | sender CPU s | receiver CPU s "
    "| sender peak RSS MB | receiver peak RSS MB (largest proc / all procs) |"
)


def _fmt(value: float, digits: int) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN check


def _table_row(s: Summary) -> str:
    case = f"**{s.case}** (baseline)" if s.baseline else s.case
    return (
        f"| {s.dataset} | {case} | {s.ok}/{s.reps} | {_fmt(s.wall_s, 3)} | "
        f"{_fmt(s.files_per_s, 0 if s.files_per_s >= 10 else 2)} | {_fmt(s.mb_per_s, 1)} | {_fmt(s.ratio, 2)} | "
        f"{_fmt(s.sender_cpu_s, 2)} | {_fmt(s.receiver_cpu_s, 2)} | {_fmt(s.sender_rss_mb, 0)} | "
        f"{_fmt(s.receiver_rss_mb, 0)} / {_fmt(s.receiver_rss_sum_mb, 0)} |"
    )


def render_tables(summaries: Sequence[Summary]) -> list[str]:
    """Return the Markdown tables, one per section; the DCMTK pair heads RECEIVE and FORWARD."""
    pairs = {s.dataset: s for s in summaries if s.section == "PAIR"}
    lines: list[str] = []
    for section, title in SECTION_TITLES.items():
        rows = [s for s in summaries if s.section == section]
        if not rows:
            continue
        lines += ["", f"### {title}", "", HEADER, "|---|---|---|" + "---:|" * 8]
        seen: set[str] = set()
        for s in rows:
            if section in {"RECEIVE", "FORWARD"} and s.dataset not in seen and s.dataset in pairs:
                lines.append(_table_row(pairs[s.dataset]))
            seen.add(s.dataset)
            lines.append(_table_row(s))
    return lines


def verdicts(summaries: Sequence[Summary]) -> list[str]:
    """Return one line per issue-7 target: measured value, target, PASS/FAIL."""
    lines = [
        "",
        "### Targets (receive, forward, concurrency: issue 18; memory: issue 7; DELAYED: issue 16)",
        "",
    ]
    for s in summaries:
        target = TARGETS.get((s.section, s.dataset))
        if target is None or s.baseline or "dicomnode" not in s.case:
            continue
        what, limit = target
        if what == "ratio":
            passed = s.ratio >= limit and s.ok == s.reps
            text = f"ratio {_fmt(s.ratio, 2)} (target >= {limit:g})"
        else:
            peak = max(
                s.receiver_rss_mb if "dicomnode" in s.case.split("->")[1] else 0.0,
                s.sender_rss_mb if s.case.startswith("dicomnode") else 0.0,
            )
            passed = peak < limit and s.ok == s.reps
            text = f"peak RSS {_fmt(peak, 0)} MB (target < {limit:g} MB)"
        verdict = "PASS" if passed else "FAIL"
        lines.append(
            f"- {s.section} {s.dataset} {s.case}: {text}, {s.ok}/{s.reps} complete: **{verdict}**"
        )
    return lines


def anchors(rows: Sequence[Measurement]) -> list[str]:
    """Return dicomnode's receive rate as a share of Orthanc's and of the durable limit,
    and the concurrency anchor (:func:`concurrency_anchor`).

    Each share is the median over reps of the same-rep quotient of MB/s, so a load spike
    hits both sides.
    """
    lines: list[str] = []
    for dataset in dict.fromkeys(r.dataset for r in rows if r.section == "RECEIVE"):
        node = {
            r.rep: r.mb_per_s
            for r in rows
            if r.ok
            and r.section == "RECEIVE"
            and r.dataset == dataset
            and r.case == NODE_RECEIVE_CASE
        }
        parts = []
        for case, label in ((ORTHANC_CASE, "x Orthanc"), (DURABLE_CASE, "of the durable limit")):
            other = {
                r.rep: r.mb_per_s
                for r in rows
                if r.ok and r.section == "RECEIVE" and r.dataset == dataset and r.case == case
            }
            shares = [node[k] / other[k] for k in node if other.get(k)]
            if shares:
                value = _median(shares)
                parts.append(
                    f"{value:.2f}{label}" if case == ORTHANC_CASE else f"{value:.0%} {label}"
                )
        if parts:
            lines.append(f"- {dataset}: dicomnode receives at " + ", ".join(parts))
    lines += concurrency_anchor(rows)
    return ["", "### Anchors (same-rep quotients)", "", *lines] if lines else []


def concurrency_anchor(rows: Sequence[Measurement]) -> list[str]:
    """Return, per dataset, how 4 senders scale against 1 for dicomnode and for storescp --fork.

    Each figure is the median over reps of that rep's MB/s with 4 senders over
    its MB/s with 1 (same receiver): what the machine's cores allow a receiver
    that does not sync, beside what dicomnode reaches.
    """
    lines: list[str] = []
    pairs = (("dicomnode", "1 storescu->dicomnode", "4 storescu->dicomnode"),)
    pairs += (("storescp --fork", FORK_ONE_CASE, FORK_FOUR_CASE),)
    for dataset in dict.fromkeys(r.dataset for r in rows if r.section == "CONCURRENCY"):
        rate = {
            (r.case, r.rep): r.mb_per_s
            for r in rows
            if r.ok and r.section == "CONCURRENCY" and r.dataset == dataset
        }
        parts = []
        for label, one_case, four_case in pairs:
            gains = [
                rate[(four_case, rep)] / rate[(one_case, rep)]
                for (case, rep) in rate
                if case == four_case and rate.get((one_case, rep))
            ]
            if gains:
                parts.append(f"{label} {_median(gains):.2f}x")
        if parts:
            lines.append(f"- {dataset}: 4 senders vs 1: " + ", ".join(parts))
    return lines


def failures(rows: Sequence[Measurement]) -> list[str]:
    """Return one line per incomplete measurement, and a note when the machine was busy."""
    lines = []
    busiest = max((r.load_1min for r in rows), default=0.0)
    if busiest > (os.cpu_count() or 1) * 0.75:
        lines += [
            "",
            f"Note: 1-minute load average reached {busiest:.1f} on {os.cpu_count()} CPUs before "
            "some measurements (other processes were running): figures are noisy; compare "
            "ratios, not absolute rates, and rerun on a quiet machine.",
        ]
    bad = [r for r in rows if not r.ok]
    if not bad:
        return [*lines, "", "All measurements complete."]
    lines += ["", "Failed measurements (not in the medians):", ""]
    for r in bad:
        lines.append(
            f"- {r.section} {r.dataset} {r.case} rep {r.rep}: {r.files_stored} of "
            f"{r.files_expected} stored, sender exit {r.sender_rc} {r.error}".rstrip()
        )
    return lines


def environment_lines(
    opts: Options, tools: Tools, datasets: dict[str, Dataset], started: dt.datetime
) -> list[str]:
    """Return the run's header: date, machine, versions, datasets."""
    version = subprocess.run(
        [tools.storescu, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    code = (
        "import pydicom, pynetdicom, dicomnode, sys;"
        "print(sys.version.split()[0], pydicom.__version__, pynetdicom.__version__,"
        " dicomnode.__version__)"
    )
    py = subprocess.run([opts.python, "-c", code], capture_output=True, text=True, check=False)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    lines = [
        f"# make bench, started {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {os.cpu_count()} CPUs, {sys.platform}, commit {commit or '?'}",
        f"- DCMTK: {version.strip('$ ')}; TCP_NODELAY={'1' if opts.nodelay else 'unset'}",
        f"- python / pydicom / pynetdicom / dicomnode: {py.stdout.strip()}",
        f"- reps: {opts.reps} (interleaved), medians of complete transfers; MB = 10^6 bytes",
        "- datasets: "
        + "; ".join(
            f"{d.name} {len(d.files)} files {d.total_bytes / MB:.1f} MB" for d in datasets.values()
        ),
    ]
    return lines


def write_report(
    opts: Options,
    tools: Tools,
    datasets: dict[str, Dataset],
    rows: Sequence[Measurement],
    started: dt.datetime,
    can_send: bool = True,
    link_note: str = "",
) -> str:
    """Write results.md and results.jsonl into ``opts.out``; return the Markdown."""
    summaries = summarise(rows)
    lines = environment_lines(opts, tools, datasets, started)
    if not can_send:
        lines += [
            "",
            "**FORWARD: not available** (dicomnode.forwarder.send_paths cannot be imported).",
        ]
    if link_note:
        lines.append(f"- DELAYED link: {link_note}")
    lines += render_tables(summaries) + verdicts(summaries) + anchors(rows) + failures(rows)
    text = "\n".join(lines) + "\n"
    (opts.out / "results.md").write_text(text, encoding="utf-8")
    with (opts.out / "results.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            record = asdict(row) | {
                "ok": row.ok,
                "mb_per_s": row.mb_per_s,
                "files_per_s": row.files_per_s,
            }
            fh.write(json.dumps(record) + "\n")
    return text


# --------------------------------------------------------------------------- main


def find_tools() -> Tools | None:
    """Return the DCMTK programs, or None when one is missing."""
    found = [shutil.which(n) for n in ("storescu", "storescp")]
    if not all(found):
        return None
    orthanc = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None
    )
    return Tools(str(found[0]), str(found[1]), orthanc)


def load_datasets(opts: Options, log: Callable[[str], None]) -> dict[str, Dataset]:
    """Generate (if needed) and list every dataset the selected sections use."""
    specs = make_data.specs_for(opts.quick)
    names = list(dict.fromkeys([*opts.datasets, *opts.conc_datasets]))
    if "memory" in opts.sections and "big" not in names:
        names.append("big")
    if "delayed" in opts.sections and opts.delayed_dataset not in names:
        names.append(opts.delayed_dataset)
    out = {}
    for name in names:
        folder = make_data.ensure_dataset(specs[name], opts.data, log)
        files = tuple(make_data.dataset_files(folder))
        out[name] = Dataset(name, folder, files, sum(p.stat().st_size for p in files))
    return out


def parse_args(argv: Sequence[str] | None) -> Options:
    """Parse the command line into :class:`Options`."""
    parser = argparse.ArgumentParser(
        description="Throughput and memory of dicomnode side by side with DCMTK (loopback).",
        epilog="Results: <out>/results.md and results.jsonl. Exit 1 when a transfer was "
        "incomplete or a tool is missing.",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions (3; --quick: 1)")
    parser.add_argument(
        "--datasets", default="ct512,small,rt", help="receive/forward datasets (ct512,small,rt)"
    )
    parser.add_argument(
        "--sections",
        default="receive,forward,memory,concurrency,delayed",
        help="any of receive,forward,memory,concurrency,delayed (all)",
    )
    parser.add_argument(
        "--delayed-dataset", default="small", help="dataset of the DELAYED section (small)"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=5.0, help="DELAYED: one-way delay in ms (5)"
    )
    parser.add_argument(
        "--delayed-associations",
        type=int,
        default=4,
        help="DELAYED: dicomnode's max_associations (4)",
    )
    parser.add_argument(
        "--conc-datasets", default="small,ct512", help="concurrency datasets (small,ct512)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny datasets (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="bench/out/<UTC timestamp>")
    parser.add_argument("--data", type=Path, default=None, help="datasets folder (bench/data)")
    parser.add_argument(
        "--nagle-default", action="store_true", help="do not export TCP_NODELAY=1 to DCMTK"
    )
    parser.add_argument("--keep", action="store_true", help="keep received files and logs")
    parser.add_argument(
        "--with-probe",
        action="store_true",
        help="add bench/raw_scp.py and raw_scu.py rows (no-pynetdicom ceiling probes, "
        "not the product)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter running dicomnode")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - {"receive", "forward", "memory", "concurrency", "delayed"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    conc = tuple(d.strip() for d in args.conc_datasets.split(",") if d.strip())
    if "concurrency" not in sections:
        conc = ()
    bad = (set(datasets) | set(conc) | {args.delayed_dataset}) - set(make_data.FULL_SPECS)
    if bad:
        parser.error(f"unknown dataset(s): {', '.join(sorted(bad))}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    data = args.data or (
        make_data.DEFAULT_DATA_DIR / "quick" if args.quick else make_data.DEFAULT_DATA_DIR
    )
    return Options(
        reps=args.reps or (1 if args.quick else 3),
        datasets=datasets,
        sections=sections,
        conc_datasets=conc,
        quick=args.quick,
        out=(args.out or BENCH_DIR / "out" / stamp).resolve(),
        data=data.resolve(),
        nodelay=not args.nagle_default,
        keep=args.keep,
        python=args.python,
        probe=args.with_probe,
        delayed_dataset=args.delayed_dataset,
        delay_ms=args.delay_ms,
        delayed_associations=args.delayed_associations,
    )


@contextlib.contextmanager
def _stopped_cleanly(bench: Bench, keep: bool) -> Iterator[None]:
    work = bench.work
    try:
        yield
    finally:
        bench.remove_spent()
        if not keep and work.exists() and not any(work.iterdir()):
            work.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print and write the tables; return 0 if every transfer was complete."""
    opts = parse_args(argv)
    tools = find_tools()
    if tools is None:
        print("bench: DCMTK storescu/storescp not found (apt-get install dcmtk)", file=sys.stderr)
        return 1
    opts.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)

    def say(text: str) -> None:
        print(text, flush=True)

    datasets = load_datasets(opts, say)
    bench = Bench(opts, tools, say)
    say(f"bench: {opts.reps} rep(s), results in {opts.out}")
    if "delayed" in opts.sections:
        bench.setup_delayed_link()
    try:
        with _stopped_cleanly(bench, opts.keep):
            for rep in range(1, opts.reps + 1):
                say(f"rep {rep}/{opts.reps}")
                bench.run_rep(rep, datasets)
    finally:
        remove_namespace(bench.netns)
    text = write_report(
        opts, tools, datasets, bench.results, started, bench.can_send, bench.link_note
    )
    print(text)
    return 0 if all(r.ok for r in bench.results) else 1


if __name__ == "__main__":
    sys.exit(main())
