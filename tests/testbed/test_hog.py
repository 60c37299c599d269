"""The cpu_hog event: busy processes that end by themselves, and that the injector cleans up."""
from __future__ import annotations

import sys
import time

import psutil
import pytest

from coel_model.errors import ConfigError
from testbed.faults import FaultInjector, event_from_dict
from testbed.scenario import parse_scenario

pytestmark = pytest.mark.integration


def test_hog_burns_its_cores_and_ends_at_its_deadline():
    t0 = time.monotonic()
    p = psutil.Popen([sys.executable, "-m", "testbed.hog", "2", "0.6"])
    time.sleep(0.3)
    kids = p.children()
    assert len(kids) == 1  # 2 cores: the process and one forked worker
    assert p.wait(10) == 0 and 0.6 <= time.monotonic() - t0 < 5
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


def test_injector_runs_a_machine_hog_and_close_kills_it():
    inj = FaultInjector(net=None, procs=None, original=None)
    r = inj.apply(event_from_dict({"kind": "cpu_hog", "cores": 1, "duration_s": 60}))
    assert r.ok and r.attrs["where"] == "machine", r
    hog = psutil.Process(r.attrs["hog_pid"])
    time.sleep(0.3)
    assert hog.cpu_percent(0.2) > 50
    inj.close()
    assert not hog.is_running() or hog.status() == psutil.STATUS_ZOMBIE


def test_cpu_hog_events_are_validated():
    with pytest.raises(ConfigError, match="whole number"):
        event_from_dict({"kind": "cpu_hog", "cores": 1.5, "duration_s": 5})
    with pytest.raises(ConfigError, match="cores"):
        event_from_dict({"kind": "cpu_hog", "duration_s": 5})
    sc = parse_scenario("name: x\ntopology: edge-star-5\nduration_s: 30\n"
                        "events:\n  - {at_s: 5, kind: cpu_hog, cores: 2, duration_s: 10, server: e1}\n")
    assert sc.events[0].cores == 2 and sc.events[0].server == "e1"
    with pytest.raises(ConfigError, match="duration_s"):
        parse_scenario("name: x\ntopology: edge-star-5\nduration_s: 30\n"
                       "events:\n  - {at_s: 5, kind: cpu_hog, cores: 2, duration_s: 0}\n")
