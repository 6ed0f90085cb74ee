"""A storm of short-deadline calls beside normal clients, against a real server (issue 14,
part 3).

48 clients send V2 ModelInfer with 1-5 ms deadlines, all on one connection of their own (one
client process's channel); 8 normal clients with 10 s deadlines share another. Without the
fix the dead calls filled grpc's queue ahead of the live ones, and grpc itself answered some
normal calls CANCELLED (its backlog limit) within a millisecond, unseen by /metrics. Now the
storm's connection is held to --max-concurrent-streams (more is refused UNAVAILABLE before
any work) and grpc holds up to --max-pending-rpcs calls before refusing any, so the normal
clients get no CANCELLED and their calls succeed; /metrics counts what grpc handed over but
no handler answered, and what expired before its handler started.

Bounded in time and count; no assertion on speed.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from pathlib import Path

import grpc
import pytest

from service._proto.inference import grpc_predict_v2_pb2 as v2
from tests.conftest import scrape, start_server

STORM_CLIENTS = 48
NORMAL_CLIENTS = 8
STORM_S = 4.0
STORM_DEADLINE_S = (0.001, 0.005)
NORMAL_DEADLINE_S = 10.0
MAX_CALLS = 200_000  # per group: a bound on the loops whatever the machine's speed
INFER = "/inference.GRPCInferenceService/ModelInfer"


async def _clients(
    target: str, request: v2.ModelInferRequest, count: int, deadline_s: tuple[float, float],
    until: float, options: list[tuple[str, int]],
) -> collections.Counter[str]:  # fmt: skip
    """`count` closed-loop clients on one channel (one connection) until `until`: codes."""
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        infer = channel.unary_unary(
            INFER,
            request_serializer=v2.ModelInferRequest.SerializeToString,
            response_deserializer=v2.ModelInferResponse.FromString,
        )

        async def client() -> None:
            while time.monotonic() < until and codes.total() < MAX_CALLS:
                try:
                    await infer(request, timeout=random.uniform(*deadline_s))
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

        await asyncio.gather(*(client() for _ in range(count)))
    return codes


async def _storm(target: str, request: v2.ModelInferRequest) -> tuple[collections.Counter, ...]:
    until = time.monotonic() + STORM_S
    # Each group gets a connection of its own: channels with the same target and arguments
    # would otherwise share one (grpc's global subchannel pool).
    own = [("grpc.use_local_subchannel_pool", 1)]
    return tuple(
        await asyncio.gather(
            _clients(target, request, NORMAL_CLIENTS, (NORMAL_DEADLINE_S,) * 2, until, own),
            _clients(target, request, STORM_CLIENTS, STORM_DEADLINE_S, until, own),
        )
    )


def _total(metrics: dict[str, list], family: str, **labels: str) -> float:
    return sum(
        s.value for s in metrics.get(family, [])
        if s.name == f"{family}_total" and all(s.labels.get(k) == v for k, v in labels.items())
    )  # fmt: skip


@pytest.mark.parametrize("frontends", ["0", "2"], ids=["single-process", "frontends-2"])
def test_a_short_deadline_storm_leaves_other_clients_served(
    repository: Path, infer_request: v2.ModelInferRequest, frontends: str
):
    served = start_server(repository, "--frontends", frontends)
    try:
        normal, storm = asyncio.run(_storm(served.target, infer_request))
        metrics = scrape(served)
    finally:
        assert served.stop() == 0
    assert storm.total() > 1000, f"no storm: {storm}"  # the storm really happened
    assert "CANCELLED" not in normal, f"normal clients: {dict(normal)}; storm: {dict(storm)}"
    assert normal["OK"] >= 0.9 * normal.total() and normal["OK"] >= NORMAL_CLIENTS, dict(normal)
    # What grpc handed over but no handler answered (the client had gone), and what expired
    # before its handler started, is counted; the storm's other calls never left grpc.
    api = {"api": "inference.v2"}
    received = _total(metrics, "cnn_serving_rpcs_received", method="ModelInfer", **api)
    answered = _total(metrics, "cnn_serving_requests", **api)
    expired = _total(metrics, "cnn_serving_rpcs_expired", method="ModelInfer", **api)
    assert received >= answered >= normal["OK"]
    assert received - answered + expired > 0, (received, answered, expired, dict(storm))
