"""The Vagrantfile: Debian 12 box, 2 CPUs, >= 8 GiB, provisions with the project's installer.

Ruby (and Vagrant) may be absent, so the checks read the text; `ruby -c` runs when available."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VF = REPO / "Vagrantfile"


def code_lines() -> str:
    """The Vagrantfile without comment lines (so a commented-out setting does not count)."""
    return "\n".join(l for l in VF.read_text().splitlines() if not l.lstrip().startswith("#"))


def test_box_and_resources():
    text = code_lines()
    assert re.search(r'config\.vm\.box\s*=\s*"debian/bookworm64"', text)
    cpus = [int(x) for x in re.findall(r"\.cpus\s*=\s*(\d+)", text)]
    mem = [int(x) for x in re.findall(r"\.memory\s*=\s*(\d+)", text)]
    assert cpus and all(c == 2 for c in cpus), cpus
    assert mem and all(m >= 8192 for m in mem), mem


def test_provisions_with_installer():
    text = code_lines()
    m = re.search(r'config\.vm\.provision\s+"shell".*?<<-SHELL\n(.*?)\n\s*SHELL', text, re.S)
    assert m, "no inline shell provisioner"
    script = m.group(1)
    assert re.search(r"^\s*bash /vagrant/install\.sh\s*$", script, re.M), script
    assert "privileged: true" in text  # Mininet and apt need root
    assert (REPO / "install.sh").is_file()
    # the checkout is synced to /vagrant without the host's venv
    assert re.search(r'synced_folder\s+"\.",\s*"/vagrant"', text)
    assert ".venv/" in text


def test_balanced_blocks():
    text = code_lines()
    opens = len(re.findall(r"\bdo\s*(\|[^|]*\|)?\s*$", text, re.M))
    ends = len(re.findall(r"^\s*end\s*$", text, re.M))
    assert opens == ends and opens >= 1, (opens, ends)


@pytest.mark.skipif(not shutil.which("ruby"), reason="ruby not installed; text checks only")
def test_ruby_syntax():
    r = subprocess.run(["ruby", "-c", str(VF)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
