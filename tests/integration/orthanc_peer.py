"""Orthanc as a peer of the tests: the forwarder's target, and the node's storage commitment peer."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import end_process, free_port, peer_env, require_tool, wait_for_port


class OrthancPeer:
    """Orthanc with a throw-away configuration in ``tmp``; DICOM and REST on free loopback ports.

    Its AE title is ``aet``; with ``node_port`` it knows the node (AE NODE) as
    modality ``node`` (to send it storage commitment reports). Started by the
    constructor (both ports listening); :meth:`stop` ends it.
    """

    def __init__(self, tmp: Path, node_port: int | None = None, aet: str = "ORTHANC") -> None:
        self.exe = require_tool("Orthanc")
        self.dicom_port = free_port()
        self.http_port = free_port()
        root = tmp / "orthanc"
        root.mkdir()
        cfg: dict[str, Any] = {
            "Name": "dicomnode-test",
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        if node_port is not None:
            cfg["DicomModalities"] = {"node": ["NODE", "127.0.0.1", node_port]}
        (root / "orthanc.json").write_text(json.dumps(cfg))
        self.log_path = root / "orthanc.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.exe, "--verbose", str(root / "orthanc.json")],
            env=peer_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.dicom_port, proc=self.proc)
        wait_for_port(self.http_port, proc=self.proc)

    def call(self, path: str, body: object = None, raw: bytes | None = None) -> Any:
        """Call Orthanc's REST API (POST when ``body`` or ``raw`` is given); return its JSON."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return json.loads(rsp.read())

    def sop_instance_uids(self) -> set[str]:
        """Return the SOP Instance UIDs Orthanc holds."""
        return {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in self.call("/instances?expand")}

    def stop(self) -> None:
        """Terminate Orthanc (kill after 15 s) and close its log."""
        end_process(self.proc, 15)
        self.log.close()
