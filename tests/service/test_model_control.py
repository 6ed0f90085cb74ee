"""Model control and version policies: the engine across scans, loads and unloads, then the
real server driven by Triton's clients (tritonclient.http here, tritonclient.grpc in its own
process: tests/service/triton_repository_probe.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ServeConfig
from service.engine import Engine
from service.errors import ConfigError, ControlRefused, ModelLoadError, ModelNotFound
from service.repository import VersionPolicy
from tests.conftest import MODEL, Served, reference, scrape, start_server
from tests.service.test_server import sample

PROBE = Path(__file__).with_name("triton_repository_probe.py")
SECOND = "second"


@pytest.mark.parametrize(
    "text, versions, chosen",
    [
        ("all", [1, 2, 5], [1, 2, 5]),
        ("latest:1", [1, 2, 5], [5]),
        ("latest:2", [1, 2, 5], [2, 5]),
        ("latest:9", [1, 2], [1, 2]),
        ("specific:1,5", [1, 2, 5], [1, 5]),
        ("specific: 2 , 7", [1, 2, 5], [2]),
        ("latest:1", [], []),
    ],
)
def test_version_policy_selects(text: str, versions: list[int], chosen: list[int]) -> None:
    policy = VersionPolicy.parse(text)
    assert policy.select(versions) == chosen
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize(
    "text", ["", "latest", "latest:0", "latest:-1", "latest:x", "specific:", "specific:1,a",
             "specific:0", "newest:1", "all:3"],
)  # fmt: skip
def test_a_bad_version_policy_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="--version-policy"):
        ServeConfig(tmp_path, version_policy=text)


def test_load_model_needs_explicit_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--load-model needs --model-control-mode explicit"):
        ServeConfig(tmp_path, load_models=("fashion",))
    with pytest.raises(ConfigError, match="--model-control-mode must be one of"):
        ServeConfig(tmp_path, model_control_mode="watch")


def copy_version(repo: Path, source: int, target: int, name: str = MODEL) -> None:
    shutil.copytree(repo / MODEL / str(source), repo / name / str(target))


def break_version(repo: Path, version: int) -> None:
    copy_version(repo, 1, version)
    (repo / MODEL / str(version) / "model.onnx").write_bytes(b"not an onnx file")


def engine_for(repo: Path, **options) -> Engine:
    return Engine(ServeConfig(repo, **{"device": "cpu", "poll_interval_s": 0, **options}))


def states(entries) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e.name, e.version): (e.state, e.reason) for e in entries}


def test_latest_policy_follows_the_repository_and_keeps_the_last_good_version(
    private_repo: Path,
) -> None:
    async def scenario() -> None:
        engine = engine_for(private_repo, version_policy="latest:1")
        await engine.start()
        assert engine.versions(MODEL) == [1]
        copy_version(private_repo, 1, 2)
        await engine.refresh()
        assert engine.versions(MODEL) == [2]  # 2 loaded, then 1 drained and unloaded
        break_version(private_repo, 3)
        await engine.refresh()
        assert engine.versions(MODEL) == [2]  # the broken 3 leaves 2 serving
        index = states(await engine.repository_index())
        assert index[(MODEL, "1")] == ("UNAVAILABLE", "not in --version-policy latest:1")
        assert index[(MODEL, "2")] == ("READY", "")
        assert index[(MODEL, "3")][0] == "UNAVAILABLE"
        assert "version 3" in index[(MODEL, "3")][1]
        assert [(e.name, e.version) for e in await engine.repository_index(True)] == [(MODEL, "2")]
        shutil.rmtree(private_repo / MODEL / "3")
        shutil.rmtree(private_repo / MODEL / "2")
        await engine.refresh()
        assert engine.versions(MODEL) == [1]  # back in the policy once 2 is gone
        await engine.stop()

    asyncio.run(scenario())


def test_specific_and_all_policies(private_repo: Path) -> None:
    for version in (2, 3):
        copy_version(private_repo, 1, version)

    async def scenario(policy: str) -> tuple[list[int], dict]:
        engine = engine_for(private_repo, version_policy=policy)
        await engine.start()
        try:
            return engine.versions(MODEL), states(await engine.repository_index())
        finally:
            await engine.stop()

    versions, index = asyncio.run(scenario("specific:1,3"))
    assert versions == [1, 3]
    assert index[(MODEL, "2")] == ("UNAVAILABLE", "not in --version-policy specific:1,3")
    assert asyncio.run(scenario("all"))[0] == [1, 2, 3]


def test_explicit_mode_loads_what_it_is_asked_and_drains_on_unload(
    private_repo: Path, sample_images
) -> None:
    copy_version(private_repo, 1, 1, SECOND)
    x, _ = sample_images
    want = reference(private_repo, x[:4])

    async def scenario() -> None:
        # A long queue delay: the requests below wait in the queue when the unload comes.
        engine = engine_for(
            private_repo,
            model_control_mode="explicit",
            load_models=(SECOND,),
            max_queue_delay_ms=60_000,
        )
        await engine.start()
        assert engine.names() == [SECOND]
        index = states(await engine.repository_index())
        assert index[(MODEL, "1")] == (
            "UNAVAILABLE",
            "unloaded (load it with RepositoryModelLoad)",
        )
        await engine.load_model(MODEL)
        assert engine.names() == [MODEL, SECOND]
        model = engine.model(MODEL)
        waiting = [asyncio.create_task(engine.infer(model, x[i : i + 1])) for i in range(4)]
        while model.batcher.depth < 4:  # type: ignore[attr-defined]
            await asyncio.sleep(0.001)
        await engine.unload_model(MODEL)  # returns once the queue has drained
        assert all(task.done() for task in waiting)
        got = np.concatenate([task.result()["probabilities"] for task in waiting])
        np.testing.assert_allclose(got, want["probabilities"], atol=1e-6)
        with pytest.raises(ModelNotFound, match="not loaded"):
            engine.model(MODEL)
        await engine.unload_model(MODEL)  # unloading what is not loaded: nothing to do
        with pytest.raises(ModelNotFound, match="no such model in the repository"):
            await engine.load_model("nope")
        with pytest.raises(ModelNotFound, match="no such model in the repository"):
            await engine.unload_model("nope")
        model_file = private_repo / SECOND / "1" / "model.onnx"
        good = model_file.read_bytes()
        model_file.write_bytes(b"broken")  # changed in place: a load reloads it
        old = engine.model(SECOND)
        with pytest.raises(
            ModelLoadError, match="reloading failed .* old files keep serving; version 1 serves"
        ):
            await engine.load_model(SECOND)
        assert engine.model(SECOND) is old  # still serving what it loaded
        model_file.write_bytes(good)
        await engine.load_model(SECOND)
        assert engine.model(SECOND) is not old  # reloaded, the old session drained
        shutil.rmtree(private_repo / SECOND / "1")
        with pytest.raises(ModelLoadError, match="no version folders"):
            await engine.load_model(SECOND)
        assert engine.names() == []
        await engine.stop()

    asyncio.run(scenario())


def test_explicit_mode_at_start(private_repo: Path) -> None:
    copy_version(private_repo, 1, 1, SECOND)

    async def names(*load: str) -> list[str]:
        engine = engine_for(private_repo, model_control_mode="explicit", load_models=load)
        await engine.start()
        try:
            return engine.names()
        finally:
            await engine.stop()

    assert asyncio.run(names()) == []
    assert asyncio.run(names("*")) == [MODEL, SECOND]
    with pytest.raises(ConfigError, match=r"--load-model nope: no such model folder .* "
                                          r"\(models there: fashion, second\)"):  # fmt: skip
        asyncio.run(names(MODEL, "nope"))


@pytest.mark.parametrize("mode", ["poll", "none"])
def test_loads_and_unloads_are_refused_outside_explicit_mode(private_repo: Path, mode) -> None:
    async def scenario() -> None:
        engine = engine_for(private_repo, model_control_mode=mode)
        await engine.start()
        try:
            for call in (engine.load_model, engine.unload_model):
                with pytest.raises(ControlRefused, match=f"--model-control-mode {mode}"):
                    await call(MODEL)
            assert engine.versions(MODEL) == [1]  # unchanged
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_mode_none_does_not_follow_the_repository(private_repo: Path) -> None:
    async def scenario() -> dict:
        engine = engine_for(private_repo, model_control_mode="none", poll_interval_s=0.05)
        await engine.start()
        copy_version(private_repo, 1, 2)
        await asyncio.sleep(0.3)  # several poll intervals: no poller runs in this mode
        try:
            assert engine.versions(MODEL) == [1]
            return states(await engine.repository_index())
        finally:
            await engine.stop()

    index = asyncio.run(scenario())
    assert index[(MODEL, "2")][0] == "UNAVAILABLE"


# ---- the real server, with Triton's clients


def health(served: Served, service: str) -> int:
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("frontends", ["0", "2"])
def test_tritonclient_http_loads_and_unloads_with_requests_in_flight(
    private_repo: Path, sample_images, frontends: str
) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    copy_version(private_repo, 1, 1, SECOND)
    x, _ = sample_images
    served = start_server(
        private_repo, "--frontends", frontends, "--model-control-mode", "explicit",
        "--load-model", MODEL, "--max-queue-delay-ms", "60000",
    )  # fmt: skip
    try:
        client = th.InferenceServerClient(served.http, concurrency=4)
        index = {(m["name"], m["version"]): m for m in client.get_model_repository_index()}
        assert index[(MODEL, "1")]["state"] == "READY"
        assert index[(SECOND, "1")]["state"] == "UNAVAILABLE"
        assert not client.is_model_ready(SECOND)
        client.load_model(SECOND)
        assert client.is_model_ready(SECOND)  # warm and ready once load_model returns
        assert health(served, SECOND) == health_pb2.HealthCheckResponse.SERVING

        inputs = []
        for i in range(3):
            tensor = th.InferInput("images", [1, 28, 28, 1], "UINT8")
            tensor.set_data_from_numpy(x[i : i + 1])
            inputs.append(tensor)
        waiting = [client.async_infer(MODEL, [tensor]) for tensor in inputs]
        while sample(scrape(served), "cnn_serving_queue_depth", "cnn_serving_queue_depth",
                     model=MODEL, version="1") < 3:  # fmt: skip
            pass  # queued for the 60 s batch delay, which only the unload's drain cuts short
        client.unload_model(MODEL)  # returns once the queue has drained
        got = np.concatenate([r.get_result(timeout=30).as_numpy("probabilities")
                              for r in waiting])  # fmt: skip
        np.testing.assert_allclose(got, reference(private_repo, x[:3])["probabilities"],
                                   atol=1e-6)  # fmt: skip
        assert not client.is_model_ready(MODEL)
        assert health(served, MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(InferenceServerException, match="not loaded") as caught:
            client.infer(MODEL, inputs[:1])
        assert caught.value.status() == "404"
        index = {(m["name"], m["version"]): m for m in client.get_model_repository_index()}
        assert index[(MODEL, "1")]["state"] == "UNAVAILABLE"
        assert [m["name"] for m in client.get_model_repository_index()
                if m["state"] == "READY"] == [SECOND]  # fmt: skip
        with pytest.raises(InferenceServerException, match="not supported: config") as caught:
            client.load_model(MODEL, config="{}")
        assert caught.value.status() == "400"
        with pytest.raises(
            InferenceServerException, match="no such model in the repository"
        ) as caught:
            client.load_model("nope")
        assert caught.value.status() == "404"
        assert "unloading model 'fashion' version 1 (unloaded on request)" in served.log.text
    finally:
        assert served.stop() == 0


def test_tritonclient_grpc_repository_calls(private_repo: Path) -> None:
    copy_version(private_repo, 1, 1, SECOND)
    copy_version(private_repo, 1, 2)
    served = start_server(
        private_repo, "--model-control-mode", "explicit", "--version-policy", "latest:1",
        "--load-model", MODEL,
    )  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, str(PROBE), served.target, MODEL, SECOND],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        steps = json.loads(done.stdout)
    finally:
        assert served.stop() == 0
    start = {(m["name"], m.get("version", "")): m.get("state", "") for m in steps["index"]}
    assert start == {(MODEL, "1"): "UNAVAILABLE", (MODEL, "2"): "READY",
                     (SECOND, "1"): "UNAVAILABLE"}  # fmt: skip
    assert steps["ready_only"] == [[MODEL, "2"]]
    assert steps["second_ready"] == [False, True]
    assert steps["after_unload"] == {"ready": False, "version_2_ready": False}
    assert "model_repository" in steps["extensions"]


def test_a_poll_server_refuses_loads_with_failed_precondition(server_refusing: Served) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(server_refusing.http)
    with pytest.raises(InferenceServerException, match="--model-control-mode poll") as caught:
        client.unload_model(MODEL)
    assert caught.value.status() == "400"
    assert client.is_model_ready(MODEL)
    entries = client.get_model_repository_index()
    assert entries == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    with grpc.insecure_channel(server_refusing.target) as channel:
        load = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        from service._proto.inference import grpc_predict_v2_pb2 as v2

        with pytest.raises(grpc.RpcError) as rpc:
            load(v2.RepositoryModelLoadRequest(model_name=MODEL), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control-mode explicit" in rpc.value.details()


@pytest.fixture
def server_refusing(repository: Path):
    served = start_server(repository)
    yield served
    assert served.stop() == 0
