"""`coel topo` and the guarantee that a malformed topology starts nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coel.cli import main

REPO = Path(__file__).resolve().parents[2]


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except FileNotFoundError:  # someone else's network just stopped
        return ""


def test_topo_validate_bundled_and_show(capsys):
    assert main(["topo", "validate"]) == 0
    out = capsys.readouterr().out
    for name in ("single-server", "edge-star-5", "edge-cloud-3tier", "metro-ring-8"):
        assert f"{name}.yaml: {name}" in out
    assert main(["topo", "show", "metro-ring-8", "--paths"]) == 0
    out = capsys.readouterr().out
    assert "m1 -> m2: 3 ms" in out and "m1 > r1 > r2 > m2" in out


@pytest.mark.integration
def test_malformed_topology_fails_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nservers:\n  - {name: e1, memory_mb: 8, colour: red}\n"
                   "controller: {name: ctl}\nlinks: [{a: e1, b: ctl}]\n")
    state = Path("/run/coel/nets")
    before = set(state.glob("*.json")) if state.is_dir() else set()
    for argv in (["topo", "validate", str(bad)], ["net", "up", str(bad), "--duration-s", "0"]):
        r = subprocess.run([sys.executable, "-m", "coel", *argv], cwd=str(REPO),
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 2, r.stderr
        assert f"{bad}:3: servers[0].colour: unknown key 'colour'" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    after = set(state.glob("*.json")) if state.is_dir() else set()
    new = [p for p in after - before if str(bad) in _read(p)]  # others may run networks now
    assert not new, f"a network was registered for a malformed topology: {new}"
