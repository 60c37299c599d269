"""Helpers (no tests) shared by the `coel run` Mininet tests: a small random model with a
tokenizer, a 4-server topology whose memory budgets force an inter-server plan, scenario text,
and the leftover check (no hosts, interfaces, cgroups, namespaces or processes after a run)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

def mininet_test(f):
    """Mark a test as a Mininet (root) test; skipped without root or mnexec."""
    f = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mnexec"), reason="needs root and Mininet's mnexec")(f)
    return pytest.mark.mininet(f)

REPO = Path(__file__).resolve().parents[2]
# every server holds experts (0.25 MiB each for ~0.8 MiB of experts at 8 bits); s1 is the entry
TOPO_PATH = REPO / "testbed" / "scenarios" / "topologies" / "tight-star-4.yaml"
SMALL_MODEL = dict(d_model=64, n_layers=2, expert_hidden=256, vocab_size=256, seed=5)


def setup_dir(tmp: Path) -> dict:
    from testbed.runner import make_random_model
    model = make_random_model(tmp / "model", **SMALL_MODEL)
    return {"model": str(model), "topology": str(TOPO_PATH), "out": tmp / "runs"}


def scenario_text(name: str, setup: dict, events: list[str], duration_s: float = 14, drain_s: float = 20,
                  static: bool = False) -> str:
    ev = "\n".join(f"  - {e}" for e in events)
    return (f"name: {name}\ntopology: {setup['topology']}\nmodel: {setup['model']}\nduration_s: {duration_s}\n"
            f"drain_s: {drain_s}\nseed: 3\nstatic: {'true' if static else 'false'}\n"
            + (f"events:\n{ev}\n" if events else ""))


def run(name: str, setup: dict, events: list[str], **kw):
    import io
    from testbed.runner import RunOptions, run_scenario
    from testbed.scenario import parse_scenario
    sc = parse_scenario(scenario_text(name, setup, events, **kw), f"{name}.yaml")
    log = io.StringIO()
    # objective quality: CoEL spreads the experts over every tight-star-4 server (what these
    # re-deployment tests need); the default latency objective may keep them on the entry
    res = run_scenario(sc, RunOptions(out_dir=setup["out"], live_progress=False, serving_timeout_s=180,
                                      extra_controller_args=("--objective", "quality")), stream=log)
    return res, log.getvalue()


def leftovers(run_dir: Path) -> dict:
    from testbed import cleanup as cl
    from testbed.cleanup import pid_alive
    meta = json.loads((run_dir / "meta.json").read_text())
    prefix = meta.get("mininet_prefix")
    shells = list((meta.get("shell_pids") or {}).values())
    procs = [p["pid"] for p in (meta.get("processes") or {}).values() if p.get("pid")]
    if not prefix:
        return {"no network was built": True}
    return {
        "interfaces": cl.intfs_of(prefix),
        "cgroups": [str(p) for p in cl.cgroups_of(prefix)],
        "processes": cl.processes_of(prefix, shells),
        "live_shells": [p for p in shells if cl._not_zombie_alive(p)],
        "live_run_processes": [p for p in procs if pid_alive(p) and cl._not_zombie_alive(p)],
        "state_file": (cl.STATE_DIR / f"{prefix}.json").exists(),
    }


def assert_clean(run_dir: Path) -> None:
    left = leftovers(run_dir)
    assert not any(left.values()), f"left behind by {run_dir.name}: {left}"


def events_of(run_dir: Path) -> list[dict]:
    from testbed.traces import merge
    return merge(sorted((run_dir / "raw").glob("*.jsonl"))).events
