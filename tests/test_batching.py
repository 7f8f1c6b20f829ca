"""The batching policy of the model services, on BentoML's own dispatcher optimizer (no server needed)."""

import segmentation.services  # noqa: F401 - installs dispatch_when_idle
from bentoml._internal.marshal.dispatcher import Optimizer


def test_after_a_burst_a_lone_request_is_not_held_back():
    opt = Optimizer(max_latency=30.0)
    # a burst: batches of 8 taking 0.4 s each, whose first requests had waited 2.5 s in the queue
    for _ in range(20):
        opt.log_outbound(n=8, wait=2.5, duration=0.4)
    opt.trigger_refresh()
    assert opt.wait == 0  # BentoML alone would now hold every lone request ~2.5 s hoping for company
    assert 0.0 < opt.o_a + opt.o_b < 1.0  # the batch cost model is still learned (used for the latency bound)


def test_the_policy_is_installed_once():
    from segmentation.services import dispatch_when_idle

    before = Optimizer.trigger_refresh
    dispatch_when_idle()
    assert Optimizer.trigger_refresh is before
