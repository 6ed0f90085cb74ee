"""Model changes under traffic and faults: requests caught by a reload or a version swap,
loads and unloads whose caller goes away, partial loads, an engine restart in explicit mode,
and a change that must be in force on every front end once its caller hears of it."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from service.__main__ import build_parser
from service.config import ServeConfig
from service.engine import Engine, control
from service.errors import ModelLoadError, Unavailable
from service.repository import VersionPolicy
from tests.conftest import MODEL, png, reference, start_server
from tests.service.test_frontends import pid_of
from tests.service.test_model_control import (
    SECOND,
    break_version,
    copy_version,
    engine_for,
    states,
)

SHAPE = (28, 28, 1)


async def until(condition, what: str, timeout_s: float = 60) -> None:
    """Wait (on the loop) until `condition()` holds; fails after a bound that catches hangs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


def relabel(repo: Path, version: int) -> None:
    """The same network under other label names: a version that answers differently."""
    metadata = repo / MODEL / str(version) / "metadata.json"
    document = json.loads(metadata.read_text())
    document["labels"] = [f"class {i}" for i in range(len(document["labels"]))]
    metadata.write_text(json.dumps(document))


def test_a_request_that_resolved_a_replaced_version_is_answered_by_it(
    private_repo: Path, sample_images
) -> None:
    x, _ = sample_images
    image = png(x[0])

    async def scenario() -> None:
        engine = engine_for(private_repo, version_policy="latest:1")
        await engine.start()
        v1 = engine.model(MODEL)  # resolved (as "the newest"), then...
        labels = v1.spec.labels
        copy_version(private_repo, 1, 2)
        relabel(private_repo, 2)
        swap = asyncio.create_task(engine.refresh())
        await until(lambda: engine.versions(MODEL) == [2], "version 2 replaced version 1")
        # ...sent after the swap: answered by version 1, with its labels, not refused
        [prediction] = await engine.classify(v1, [image])
        assert prediction.version == 1 and prediction.label in labels
        v2 = engine.model(MODEL)
        assert v2.spec.version == 2 and v2.spec.labels != labels
        # a front end's request goes where its shape and labels say, while version 1 retires
        assert engine.resolve(MODEL, 1, SHAPE, v1.spec.labels_crc).spec is v1.spec
        assert engine.resolve(MODEL, 2, SHAPE, v2.spec.labels_crc).spec is v2.spec
        with pytest.raises(Unavailable, match="version 2 was unloaded or replaced .*; retry"):
            engine.resolve(MODEL, 2, SHAPE, v1.spec.labels_crc)  # other labels than it knew
        with pytest.raises(Unavailable, match="replaced"):
            engine.resolve(MODEL, 2, (32, 32, 3), v2.spec.labels_crc)
        await swap  # version 1 has retired: now it refuses
        with pytest.raises(Unavailable, match="version 1: this model version is being unloaded"):
            await engine.infer(v1, x[:1])
        with pytest.raises(Unavailable, match="version 1 was unloaded or replaced"):
            engine.resolve(MODEL, 1, SHAPE, v1.spec.labels_crc)
        await engine.stop()

    asyncio.run(scenario())


def test_a_stop_cuts_what_a_retiring_version_still_holds(private_repo: Path, sample_images) -> None:
    x, _ = sample_images

    async def scenario() -> None:
        engine = engine_for(private_repo, version_policy="latest:1", max_queue_delay_ms=60_000)
        await engine.start()
        v1 = engine.model(MODEL)
        copy_version(private_repo, 1, 2)
        swap = asyncio.create_task(engine.refresh())
        await until(lambda: engine.versions(MODEL) == [2], "version 2 replaced version 1")
        waiting = asyncio.create_task(engine.infer(v1, x[:1]))  # queued for 60 s in version 1
        await until(lambda: v1.batcher.depth == 1, "the request is queued")
        await engine.stop()  # answers it at once, as every loaded version's queue
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(waiting, 10)
        await asyncio.gather(swap, return_exceptions=True)

    asyncio.run(scenario())


def test_a_request_caught_by_a_reload_is_answered_by_the_old_session(
    private_repo: Path, sample_images
) -> None:
    x, _ = sample_images
    want = reference(private_repo, x[:1])["probabilities"]

    async def scenario() -> None:
        engine = engine_for(private_repo, model_control_mode="explicit", load_models=(MODEL,))
        await engine.start()
        old = engine.model(MODEL, 1)
        relabel(private_repo, 1)  # changed on disk: the load below reloads it
        reload = asyncio.create_task(engine.load_model(MODEL))
        await until(lambda: engine.model(MODEL, 1) is not old, "the new session took over")
        assert engine.model(MODEL, 1).spec.labels != old.spec.labels
        got = await engine.infer(old, x[:1])  # looked up before: the old session answers
        np.testing.assert_allclose(got["probabilities"], want, atol=1e-6)
        await reload
        await engine.stop()

    asyncio.run(scenario())


def test_a_partial_load_fails_naming_the_versions_and_keeps_the_good_ones(
    private_repo: Path,
) -> None:
    break_version(private_repo, 2)

    async def load(policy: str) -> tuple[str, list[int]]:
        engine = engine_for(private_repo, model_control_mode="explicit", version_policy=policy)
        await engine.start()
        try:
            with pytest.raises(ModelLoadError) as caught:
                await engine.load_model(MODEL)
            return str(caught.value), engine.versions(MODEL)
        finally:
            await engine.stop()

    message, versions = asyncio.run(load("all"))
    assert versions == [1]
    assert message.startswith(f"model {MODEL!r}: model {MODEL!r} version 2")
    assert message.endswith("; version 1 serves")
    assert str(private_repo) not in message and f"{MODEL}/2/model.onnx" in message
    message, versions = asyncio.run(load("latest:1"))  # the broken 2 leaves 1 serving
    assert versions == [1] and "version 2" in message and message.endswith("version 1 serves")
    message, versions = asyncio.run(load("specific:1,7"))
    assert versions == [1]
    assert "no version folder 7 (--version-policy specific:1,7); version 1 serves" in message


def test_a_cancelled_load_or_unload_runs_to_its_end(private_repo: Path, sample_images) -> None:
    x, _ = sample_images

    async def scenario() -> None:
        engine = engine_for(private_repo, model_control_mode="explicit", max_queue_delay_ms=60_000)
        await engine.start()
        loading = asyncio.create_task(engine.load_model(MODEL))
        await asyncio.sleep(0)  # it has begun (and is warming up on the loader thread)
        loading.cancel()  # the caller went away (a cancelled RPC)
        with pytest.raises(asyncio.CancelledError):
            await loading
        await until(lambda: engine.versions(MODEL) == [1], "the load finished")
        assert states(await engine.repository_index())[(MODEL, "1")] == ("READY", "")
        model = engine.model(MODEL)
        queued = [asyncio.create_task(engine.infer(model, x[i : i + 1])) for i in range(3)]
        await until(lambda: model.batcher.depth == 3, "three requests are queued")
        unloading = asyncio.create_task(engine.unload_model(MODEL))
        await asyncio.sleep(0)  # it has begun
        unloading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await unloading
        done = await asyncio.wait_for(asyncio.gather(*queued), 30)  # the drain went on
        got = np.concatenate([outputs["probabilities"] for outputs in done])
        np.testing.assert_allclose(got, reference(private_repo, x[:3])["probabilities"],
                                   atol=1e-6)  # fmt: skip
        await engine.unload_model(MODEL)  # waits for the first one; then nothing to do
        index = states(await engine.repository_index())
        assert index[(MODEL, "1")] == ("UNAVAILABLE", "unloaded (load it with RepositoryModelLoad)")
        await engine.stop()

    asyncio.run(scenario())


def test_callers_that_go_away_while_waiting_for_their_turn_drop_out(
    private_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    break_version(private_repo, 2)  # every load retries it: a load that runs leaves a line

    async def scenario() -> None:
        engine = engine_for(private_repo, model_control_mode="explicit")
        await engine.start()
        callers = [asyncio.create_task(engine.load_model(MODEL)) for _ in range(20)]
        await asyncio.sleep(0)  # the first has begun; the others wait for their turn
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await until(lambda: engine.versions(MODEL) == [1], "the first load finished")
        await engine.unload_model(MODEL)  # its turn comes after the first load's end
        await engine.stop()

    with caplog.at_level("ERROR", logger="service.engine.core"):
        asyncio.run(scenario())
    tries = [r for r in caplog.records if r.getMessage().startswith(f"skipping model {MODEL!r}")]
    assert len(tries) == 1


def test_index_reasons_in_explicit_mode(private_repo: Path) -> None:
    async def scenario() -> None:
        engine = engine_for(private_repo, model_control_mode="explicit", load_models=(MODEL,))
        await engine.start()
        copy_version(private_repo, 1, 2)  # appears after the load: no scan loads it
        index = states(await engine.repository_index())
        assert index[(MODEL, "2")] == (
            "UNAVAILABLE",
            "appeared after the model was loaded (load it again to serve it)",
        )
        break_version(private_repo, 3)
        with pytest.raises(ModelLoadError, match="version 3"):
            await engine.load_model(MODEL)
        assert engine.versions(MODEL) == [1, 2]
        assert "version 3" in states(await engine.repository_index())[(MODEL, "3")][1]
        await engine.unload_model(MODEL)  # an old failure is no reason once unloaded
        index = states(await engine.repository_index())
        assert index[(MODEL, "3")] == ("UNAVAILABLE", "unloaded (load it with RepositoryModelLoad)")
        shutil.move(private_repo, private_repo.with_name("moved"))
        with pytest.raises(Unavailable, match="the model repository is missing or unreadable"):
            await engine.load_model(MODEL)
        with pytest.raises(Unavailable, match="the model repository is missing or unreadable"):
            await engine.repository_index()
        await engine.stop()

    asyncio.run(scenario())


def test_a_version_being_reloaded_is_ready_in_the_index() -> None:
    entries = control.index(
        {MODEL: [1, 2]}, [MODEL], {MODEL: [1]}, {(MODEL, 1): control.LOADING,
        (MODEL, 2): control.LOADING}, {}, VersionPolicy.parse("all"), "explicit",
    )  # fmt: skip
    assert states(entries) == {(MODEL, "1"): ("READY", ""), (MODEL, "2"): ("LOADING", "")}


def test_models_loaded_on_request_survive_an_engine_restart(private_repo: Path) -> None:
    copy_version(private_repo, 1, 1, SECOND)
    state = private_repo.parent / "loaded-models.json"

    async def restart(*change: tuple[str, str]) -> list[str]:
        config = ServeConfig(private_repo, device="cpu", poll_interval_s=0,
                             model_control_mode="explicit", load_models=(MODEL,))  # fmt: skip
        engine = Engine(config, state_path=state)
        await engine.start()
        for what, name in change:
            await (engine.load_model if what == "load" else engine.unload_model)(name)
        names = engine.names()
        await engine.stop()
        return names

    assert asyncio.run(restart()) == [MODEL]  # nothing asked yet: --load-model's
    assert asyncio.run(restart(("load", SECOND), ("unload", MODEL))) == [SECOND]
    assert asyncio.run(restart()) == [SECOND]  # as the last engine left it
    for bad in ("null", "5", '"second"', "[1]", "{"):  # not a list of names: --load-model's
        state.write_text(bad)
        assert asyncio.run(restart()) == [MODEL]
    state.write_text(json.dumps([SECOND]))
    shutil.rmtree(private_repo / SECOND)
    assert asyncio.run(restart()) == []  # gone from the repository: logged and skipped
    state.unlink()
    state.mkdir()  # cannot be written: the change goes on, and the log says so
    assert asyncio.run(restart(("unload", MODEL))) == []


def test_a_restarted_engine_process_loads_what_was_loaded_on_request(private_repo: Path) -> None:
    import tritonclient.http as th

    copy_version(private_repo, 1, 1, SECOND)
    served = start_server(private_repo, "--frontends", "1", "--model-control-mode", "explicit",
                          "--load-model", MODEL)  # fmt: skip
    try:
        client = th.InferenceServerClient(served.http)
        client.load_model(SECOND)
        client.unload_model(MODEL)
        engine = pid_of(served, "engine")
        os.kill(engine, signal.SIGKILL)
        pid_of(served, "engine", after=engine)
        served.log.wait_for(r"loading the models loaded before the engine restarted", 60)
        deadline = time.monotonic() + 60
        while not ready(client, SECOND) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready(client, SECOND) and not ready(client, MODEL)
    finally:
        assert served.stop() == 0


def ready(client, name: str) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return client.is_model_ready(name)
    except InferenceServerException:  # the front end between engines: 503
        return False


def test_a_change_is_in_force_on_every_front_end_when_it_returns(
    private_repo: Path, sample_images
) -> None:
    from tests.service.test_frontends import Load

    x, _ = sample_images
    copy_version(private_repo, 1, 1, SECOND)
    served = start_server(private_repo, "--frontends", "2", "--model-control-mode", "explicit",
                          "--load-model", MODEL)  # fmt: skip
    # kept-alive connections, which the kernel spread over both front ends when they opened
    connections = [http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=60)
                   for _ in range(8)]  # fmt: skip

    def call(connection: http.client.HTTPConnection, method: str, path: str) -> int:
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        answer = connection.getresponse()
        answer.read()
        return answer.status

    def seen_ready() -> set[int]:
        return {call(c, "GET", f"/v2/models/{SECOND}/ready") for c in connections}

    load = Load(served, x, threads=4)  # both front ends busy with traffic of their own
    try:
        assert seen_ready() == {404}
        for _ in range(10):
            assert call(connections[0], "POST", f"/v2/repository/models/{SECOND}/load") == 200
            assert seen_ready() == {200}
            assert call(connections[0], "POST", f"/v2/repository/models/{SECOND}/unload") == 200
            assert seen_ready() == {404}
        assert set(load.stop()) == {"OK"}
    finally:
        load.stop()
        for connection in connections:
            connection.close()
        assert served.stop() == 0


def test_repository_bodies_are_small(private_repo: Path) -> None:
    served = start_server(private_repo, "--frontends", "0")
    try:
        body = json.dumps({"ready": True, "pad": "x" * 100_000}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
        connection.request("POST", "/v2/repository/index", body=body)
        answer = connection.getresponse()
        error = json.loads(answer.read())["error"]
        assert answer.status == 413
        assert "over the limit of 65,536 bytes (for this request)" in error
    finally:
        assert served.stop() == 0


def test_the_load_model_flag_replaces_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_SERVING_LOAD_MODEL", "a,b")
    args = build_parser().parse_args(["serve", "--repository", "r"])
    assert args.load_models == ["a", "b"]
    args = build_parser().parse_args(["serve", "--repository", "r", "--load-model", "c",
                                      "--load-model", "d"])  # fmt: skip
    assert args.load_models == ["c", "d"]


CALLED: list[str] = []  # the methods _plain_app was called for (once a request's head is in)


async def _plain_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    CALLED.append(scope["method"])
    await receive()  # the body (a POST's below never comes)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("complete", [True, False])
def test_only_a_connection_with_a_request_unread_lingers(complete: bool) -> None:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.rest.protocol import guarded

    made: list = []

    class Probe(guarded(30.0)):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            self.socket_transport = transport  # the real one, under the lingering wrapper
            made.append(self)
            super().connection_made(transport)

    async def close_after(request: bytes) -> bool:
        config = Config(_plain_app, lifespan="off", log_level="warning")
        state = ServerState()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Probe(config, state, {}), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        if complete:
            await reader.readuntil(b"ok")  # answered: the connection is idle (keep-alive)
        else:
            await until(lambda: "POST" in CALLED, "the head has arrived (the body never will)")
        protocol = made[0]
        protocol.transport.close()  # what uvicorn does at shutdown or on an early answer
        closed_at_once = protocol.socket_transport.is_closing()
        writer.close()
        server.close()
        await asyncio.sleep(0)
        return closed_at_once

    if complete:  # nothing unread: closed at once (no lingering at shutdown)
        assert asyncio.run(close_after(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    else:  # a body still to come: the connection lingers, reading and dropping it
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789"
        assert not asyncio.run(close_after(head))
