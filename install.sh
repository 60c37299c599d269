#!/usr/bin/env bash
# CoEL-testbed installer: the one place that installs what the project needs.
# Idempotent: a second run checks and returns quickly. Used by the README commands,
# .ci/run (through the README's test command) and the Vagrantfile provisioning.
# Run as root on Debian 12.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${COEL_VENV:-$HERE/.venv}"
STAMP="$VENV/.coel-install-stamp"
APT_PACKAGES=(mininet iperf3 iproute2 iputils-ping bridge-utils iptables procps psmisc openssh-server
              sudo python3-venv python3-dev build-essential cgroup-tools)

log() { printf '[install] %s\n' "$*" >&2; }

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  if [[ $EUID -ne 0 ]]; then
    log "missing Debian packages (${need_apt[*]}); run this installer as root"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Open vSwitch is only "recommended" by mininet; the testbed uses Linux bridges.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY="${COEL_PYTHON:-/usr/bin/python3}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv at $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

# Native kernels: compiled here, never by a running process (a compile at first use starved every
# heartbeat on the machine mid-traffic). Idempotent: returns at once when the library is built.
build_kernels() {
  "$VENV/bin/python" -m coel_model.kernels --build >&2 || { log "native kernel build failed"; exit 1; }
}

# Re-install only when the project's dependency list changed since the last run.
want="$(sha256sum "$HERE/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import torch, coel_model" 2>/dev/null; then
  build_kernels
  log "up to date ($VENV)"
  exit 0
fi
log "installing Python packages into $VENV (torch pinned to 2.13.0, CPU)"
PIP_LOG="$VENV/pip-install.log"
pip_install() {  # quiet on success; the whole log on failure
  if ! "$VENV/bin/python" -m pip install -q "$@" >>"$PIP_LOG" 2>&1; then
    cat "$PIP_LOG" >&2; log "pip install $* failed (log: $PIP_LOG)"; exit 1
  fi
}
: > "$PIP_LOG"
pip_install --upgrade pip setuptools wheel
pip_install "torch==2.13.0"
pip_install -e "$HERE[test]"
echo "$want" > "$STAMP"
build_kernels
log "done: $("$VENV/bin/python" -c 'import torch,sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"
