"""Which datasets an ``own`` caller sees (docs/design.md §11, "Scope").

An ``own`` caller sees the datasets it uploaded through the gateway and the
output datasets of its own batches, recorded under ``dataset_key(id)`` in
the same store as batch owners. A batch's ``output_dataset_id`` is recorded
as its owner's whenever an upstream answer that names it passes through the
gateway (a retrieve, a refresh for waiters, a list page, a create); each
output is looked at once per process, so a cached answer served again costs
nothing, and a batch polled after it ended costs no store write.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable

from cachetools import LRUCache

from gateway import errors
from gateway.api import rules
from gateway.api.auth import Caller
from gateway.api.state import GatewayState
from gateway.datasets.facts import output_dataset_id
from gateway.ops.logs import log_event
from gateway.records.base import Records, dataset_key

log = logging.getLogger("gateway")

# Outputs already looked at, per record store (a process may hold several in tests): bounded.
_LOOKED_AT: weakref.WeakKeyDictionary[Records, LRUCache[str, bool]] = weakref.WeakKeyDictionary()
LOOKED_AT_SIZE = 100_000


async def check_dataset_visible(state: GatewayState, caller: Caller, dataset_id: str) -> None:
    """404 ``not_found`` for a dataset an ``own`` caller neither uploaded nor got from its own batch."""
    if not rules.sees_every_batch(caller) and not rules.may_see(
        caller, await state.records.owner_of(dataset_key(dataset_id))
    ):
        raise errors.NotVisible("No dataset with this id.")


async def check_input_dataset(state: GatewayState, caller: Caller, input_dataset_id: str) -> None:
    """An ``own`` caller may not name another caller's dataset in a create; one never seen stays allowed."""
    if rules.sees_every_batch(caller):
        return
    owner = await state.records.owner_of(dataset_key(input_dataset_id))
    if owner is not None and owner != caller.name:
        raise errors.NotVisible(f"No dataset with the id '{input_dataset_id[:128]}' (input_dataset_id).")


async def record_outputs(state: GatewayState, batches: Iterable[object], owner: str | None = None) -> None:
    """Record each batch's ``output_dataset_id`` as the batch owner's (``owner`` if known, else the store's).

    A store that fails is logged and counted: the answer still reaches its caller.
    """
    records = state.records
    looked_at = _LOOKED_AT.setdefault(records, LRUCache(maxsize=LOOKED_AT_SIZE))
    for batch in batches:
        output = output_dataset_id(batch)
        batch_id = batch.get("id") if isinstance(batch, dict) else None
        if output is None or not isinstance(batch_id, str) or output in looked_at:
            continue
        try:
            batch_owner = owner or await records.owner_of(batch_id)
            if batch_owner is not None and records.known_owner(dataset_key(output)) is None:
                await records.record_owner(dataset_key(output), batch_owner)
        except errors.StoreUnavailable:
            state.metrics.store_write_failures.inc()
            log_event(log, logging.ERROR, "could not record a batch's output dataset", batch_id=batch_id)
            continue
        # A batch's owner never changes once its create has answered: one look per output is enough.
        looked_at[output] = True
