"""End to end: DCMTK storescu sends Enhanced MR to ``python -m dicomnode``; classic series appears.

Also runs the offline ``python -m dicomnode convert`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicomnode.convert.native import name_based_uid
from tests.conftest import files_below, peer_env, require_tool, wait_until, write_config
from tests.enhanced_factory import (
    ROOT,
    assert_valid_classic,
    frame_pixels,
    frame_positions,
    make_enhanced_mr,
    save,
)

pytestmark = pytest.mark.interop


def _classic(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if f.startswith("MR_2.25.")]
    return sorted(found)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, RLELossless])
def test_receiver_converts_enhanced_mr_sent_by_storescu(
    tmp_path: Path, port: int, start_node, transfer_syntax: str
) -> None:  # type: ignore[no-untyped-def]
    storescu = require_tool("storescu")
    dciodvfy = require_tool("dciodvfy")
    dest = tmp_path / "dest"
    cfg = write_config(
        tmp_path / "node.ini",
        {
            "General": {"ae_title": "DNODE"},
            "Network": {"server_ip": "127.0.0.1", "receive_port": port},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SCANNER"},
            "Tools": {"enhanced_mr_conversion": "native", "keep_enhanced_original": "true"},
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    source = save(
        make_enhanced_mr(transfer_syntax=transfer_syntax, vendor=True), tmp_path / "enh.dcm"
    )
    extra = ["-xr"] if transfer_syntax == RLELossless else []  # propose RLE Lossless
    sent = subprocess.run(
        [storescu, "-aet", "SCANNER", "-aec", "DNODE", *extra, "127.0.0.1", str(port), str(source)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    root = dest / "incoming"
    assert wait_until(lambda: len(_classic(root)) == 4, 30), node.output()
    # Log lines of receiver processes reach the node's log through a queue: poll.
    assert wait_until(lambda: "CONVERTED" in node.output(), 10), node.output()
    originals = [
        p
        for p in files_below(root)
        if p.name.startswith("MR_" + ROOT)
        and p.suffix == ".dcm"
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    assert len(originals) == 1  # the enhanced original is kept in its own series folder
    files = _classic(root)
    assert len({p.parent for p in files}) == 1
    assert files[0].parent.parent == originals[0].parent.parent  # same patient/study folder
    pixels = frame_pixels(4, 8, 10)
    by_instance = sorted((dcmread(p) for p in files), key=lambda d: int(d.InstanceNumber))
    for i, ds in enumerate(by_instance):
        assert ds.SeriesInstanceUID == name_based_uid(ROOT + "2")
        assert [float(x) for x in ds.ImagePositionPatient] == frame_positions(4)[i]
        assert np.array_equal(ds.pixel_array, pixels[i])
    for path in files:
        assert_valid_classic(dciodvfy, path)


def test_offline_convert_command(tmp_path: Path, node_env: dict[str, str]) -> None:
    source = save(make_enhanced_mr(), tmp_path / "in" / "enh.dcm")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode", "convert", str(source.parent), "--out", str(out)],
        cwd=tmp_path,
        env=node_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_classic(out)) == 4
    assert "CONVERTED" in proc.stdout + proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "dicomnode", "convert", str(tmp_path / "nope"), "--out", str(out)],
        cwd=tmp_path,
        env=node_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
