"""Native kernels are built by the installer, never by a running process (issue 12)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coel_model import kernels

pytestmark = pytest.mark.integration

STATUS = "from coel_model import kernels; print(kernels.status())"


def _py(code_or_args, cache, **env):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    e = dict(os.environ, COEL_KERNEL_CACHE=str(cache), **env)
    e.pop("COEL_KERNELS", None)
    return subprocess.run([sys.executable, *args], env=e, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(kernels._cpu_ok() is not None or kernels._compiler() is None,
                    reason="no AVX2 CPU or no compiler: only the fallback exists here")
def test_a_process_never_compiles_and_the_installer_step_is_idempotent(tmp_path):
    r = _py(STATUS, tmp_path)
    assert r.stdout.startswith("fallback: native library not built"), r.stdout + r.stderr
    assert not list(tmp_path.glob("*.so"))  # the process did not compile
    r = _py(["-m", "coel_model.kernels", "--build"], tmp_path)
    assert r.returncode == 0 and "native kernels:" in r.stdout, r.stderr
    (lib,) = tmp_path.glob("*.so")
    mtime = lib.stat().st_mtime_ns
    r = _py(["-m", "coel_model.kernels", "--build"], tmp_path)  # second run: found, not rebuilt
    assert r.returncode == 0 and lib.stat().st_mtime_ns == mtime
    assert _py(STATUS, tmp_path).stdout.startswith("native")
