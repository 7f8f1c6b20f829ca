"""The batching policy of the model services, on BentoML's own dispatcher optimizer (no server needed)."""

from bentoml._internal.marshal.dispatcher import Optimizer

from segmentation import bentoml_workarounds

bentoml_workarounds.apply(spool_max_size=1 << 20)


def test_after_a_burst_a_lone_request_is_not_held_back():
    opt = Optimizer(max_latency=30.0)
    # a burst: batches of 8 taking 0.4 s each, whose first requests had waited 2.5 s in the queue
    for _ in range(20):
        opt.log_outbound(n=8, wait=2.5, duration=0.4)
    opt.trigger_refresh()
    assert opt.wait == 0  # BentoML alone would now hold every lone request ~2.5 s hoping for company
    assert 0.0 < opt.o_a + opt.o_b < 1.0  # the batch cost model is still learned (used for the latency bound)


def test_the_workarounds_are_installed_once():
    before = Optimizer.trigger_refresh
    bentoml_workarounds.apply(spool_max_size=1 << 20)
    assert Optimizer.trigger_refresh is before
