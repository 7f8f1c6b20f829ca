"""How each model service splits the CPUs into workers and threads, and how the gateway calls it (no model, no
server)."""

import pytest

from segmentation import services


@pytest.fixture
def cpus(monkeypatch):
    for var in ("SEG_NUM_THREADS", "SEG_MODEL_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    for name in services.PREFERRED_WORKERS:
        monkeypatch.delenv(f"SEG_{name.upper()}_WORKERS", raising=False)
        monkeypatch.delenv(f"SEG_{name.upper()}_THREADS", raising=False)

    def set_cpus(n):
        monkeypatch.setattr(services, "available_cpus", lambda: n)

    return set_cpus


def test_defaults_give_each_model_one_worker_with_every_cpu(cpus):
    cpus(2)
    assert all(services.parallelism(name) == (1, 2) for name in services.PREFERRED_WORKERS)
    cpus(8)
    assert services.parallelism("unet") == (1, 8)


def test_a_model_preferring_two_workers_gets_the_cpus_split_between_them(cpus, monkeypatch):
    monkeypatch.setitem(services.PREFERRED_WORKERS, "unet", 2)
    cpus(2)
    assert services.parallelism("unet") == (2, 1)
    cpus(8)
    assert services.parallelism("unet") == (2, 4)
    cpus(1)
    assert services.parallelism("unet") == (1, 1)


def test_one_cpu_gets_one_single_threaded_worker(cpus):
    cpus(1)
    assert all(services.parallelism(name) == (1, 1) for name in services.PREFERRED_WORKERS)


def test_a_models_own_variables_win_over_the_global_ones(cpus, monkeypatch):
    cpus(8)
    monkeypatch.setenv("SEG_NUM_THREADS", "2")
    assert services.parallelism("mask2former") == (1, 2)
    monkeypatch.setitem(services.PREFERRED_WORKERS, "unet", 2)
    assert services.parallelism("unet") == (2, 2)  # 2 workers x 2 threads fit in 8 CPUs
    monkeypatch.setenv("SEG_MODEL_WORKERS", "3")
    monkeypatch.setenv("SEG_UNET_WORKERS", "4")
    monkeypatch.setenv("SEG_UNET_THREADS", "1")
    assert services.parallelism("unet") == (4, 1)
    assert services.parallelism("mask2former") == (3, 2)


def test_global_threads_alone_never_oversubscribe_the_cpus(cpus, monkeypatch):
    monkeypatch.setitem(services.PREFERRED_WORKERS, "unet", 2)
    cpus(2)
    monkeypatch.setenv("SEG_NUM_THREADS", "2")
    assert services.parallelism("unet") == (1, 2)


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_count_names_the_variable(cpus, monkeypatch, value):
    cpus(2)
    monkeypatch.setenv("SEG_UNET_WORKERS", value)
    with pytest.raises(ValueError, match="SEG_UNET_WORKERS"):
        services.parallelism("unet")


class _FlakyModel:
    """A model service stand-in whose first ``failures`` calls fail the way a closed kept-alive connection does."""

    def __init__(self, failures, error):
        self.failures, self.error, self.calls = failures, error, 0
        self.to_async = self

    async def predict(self, images):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return [{"labels": image} for image in images]


def test_a_call_on_a_connection_the_model_closed_is_made_again():
    import asyncio

    import aiohttp

    model = _FlakyModel(1, aiohttp.ClientOSError(None, "Can not write request body"))
    assert asyncio.run(services.call_model(model, ["x"], "unet")) == [{"labels": "x"}] and model.calls == 2
    down = _FlakyModel(2, aiohttp.ServerDisconnectedError())
    with pytest.raises(aiohttp.ServerDisconnectedError):  # twice: the gateway answers 503
        asyncio.run(services.call_model(down, ["x"], "unet"))
    slow = _FlakyModel(1, aiohttp.ServerTimeoutError())
    with pytest.raises(aiohttp.ServerTimeoutError):  # a timeout is not repeated
        asyncio.run(services.call_model(slow, ["x"], "unet"))
    assert slow.calls == 1


def test_a_call_the_model_queue_refuses_is_a_503_naming_the_model_and_frees_its_place():
    import asyncio

    import bentoml

    queue = services.model_queue("unet")
    refused = _FlakyModel(1, bentoml.exceptions.ServiceUnavailable("Service Busy"))
    with pytest.raises(services.ModelUnavailable) as e:
        asyncio.run(services.call_model(refused, ["x", "y"], "unet"))
    assert "the unet model is busy" in str(e.value) and "SEG_MAX_LATENCY_MS" in str(e.value)
    assert e.value.retry_after_s == -(-services.latency_bound_ms("unet") // 1000) and refused.calls == 1
    assert queue.images == 0  # the refused images no longer count as ahead of the next call
