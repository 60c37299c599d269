"""Issue 12 in Mininet: after a link comes back, the server is back once and stays back (no
lost/rejoined flapping), and nobody else is ever convicted. tight-star-4, s3's link down 4-12 s."""
from __future__ import annotations

import pytest

from tests.testbed.run_helpers import assert_clean, mininet_test, run, setup_dir

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return setup_dir(tmp_path_factory.mktemp("tbliveness"))


@mininet_test
def test_link_up_leaves_no_flap(setup):
    res, log = run("tb-link-flap", setup, ["{at_s: 4, kind: link_down, link: [s3, hub]}",
                                           "{at_s: 12, kind: link_up, link: [s3, hub]}"], duration_s=24)
    assert res.outcome == "completed" and res.error is None, (res.outcome, res.error, log[-3000:])
    s = res.summary
    live = s["liveness"]
    assert s["spurious_detections"] == 0 and s["flaps"] == 0, live
    assert [v["server"] for v in live["lost_verdicts"]] == ["s3"], live
    (back,) = live["back"]
    assert back["server"] == "s3" and back["stayed_back"] and back["back_s"] <= 2.0, back
    assert s["lost_requests"] == 0, s["fault_responses"]
    assert_clean(res.run_dir)
