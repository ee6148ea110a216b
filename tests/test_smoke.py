from __future__ import annotations

from gateway.demo.simulator import Simulator
from tests.conftest import GatewayFactory
from tests.support import make_config, sdk


async def test_sdk_retrieves_a_batch_through_the_gateway(simulator: Simulator, start: GatewayFactory) -> None:
    gateway = await start(make_config(simulator.url))
    response = await sdk(gateway.url).batches.retrieve("batch-1")
    assert response.batch.id == "batch-1"
    assert response.batch.status == "BATCH_STATUS_QUEUED"
    assert simulator.calls == 1
