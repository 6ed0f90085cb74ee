"""The pieces of a scoring job that a crash tests: chunks, resumption, the lock, the formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.errors import ScoringError
from service.scoring import table as tables
from service.scoring.files import Item, label_matcher, true_label, walk
from service.scoring.store import VALID_SINCE, ChunkStore, companions

LABELS = ("T-shirt/top", "Trouser", "Ankle boot")
JOB = {"directory": "/data", "model": "m", "version": 3}


def some_rows(keys: list[str], failed: list[str] = ()) -> tables.Rows:
    rows = tables.Rows("m", 3, LABELS)
    probabilities = np.random.default_rng(len(keys)).dirichlet(np.ones(3), len(keys))
    bottleneck = np.arange(2 * len(keys), dtype=np.float32).reshape(-1, 2)
    rows.scored(keys, ["Trouser"] * len(keys), probabilities.astype(np.float32), bottleneck)
    rows.failed(list(failed), [None] * len(failed), ["corrupt or truncated image: é"] * len(failed))
    return rows


def test_a_crash_between_the_final_write_and_the_clean_up_leaves_each_path_once(tmp_path):
    out = tmp_path / "scores.parquet"
    store = ChunkStore(out, "parquet", JOB, 0)
    assert store.open(overwrite=False).num_rows == 0
    first, second = some_rows(["a.png", "b.png"]).table(), some_rows(["c.png"], ["d.png"]).table()
    store.write(first)
    store.write(second)
    tables.write(tables.empty(), out, "parquet")  # (a stand-in for the old FILE)
    tables.write(first, out, "parquet")  # FILE written, chunks not yet removed: then kill -9
    store.close()
    (store.parts / ".chunk-000009.parquet.tmp-1").write_bytes(b"half a chunk")

    again = ChunkStore(out, "parquet", JOB, 0)
    done = again.open(overwrite=False)
    assert done["path"].to_pylist() == ["a.png", "b.png", "c.png", "d.png"]
    assert not list(again.parts.glob(".*tmp*"))  # the half-written chunk is gone
    done = done.drop_columns([VALID_SINCE])
    again.finish(done, lambda: None)
    assert not again.parts.exists() and tables.read(out, "parquet").equals(done)


def test_a_job_removes_only_its_own_temporaries(tmp_path):
    """`a.parquet` and `a.parquet.bak.parquet` in one folder: opening the first one's job
    removes what a crash left of its own writes, never the other's (nor those of an output
    named like a temporary of it)."""
    out = tmp_path / "a.parquet"
    ours = [tables.temporary(path, 41) for path in (out, *companions(out))]
    others = [
        tables.temporary(path, 42)
        for other in (tmp_path / "a.parquet.bak.parquet", tmp_path / "a.parquet.tmp-x")
        for path in (other, *companions(other))
    ]
    for path in ours + others:
        path.write_bytes(b"half a file")
    store = ChunkStore(out, "parquet", JOB, 0)
    store.open(overwrite=False)
    store.close()
    assert [path.exists() for path in ours] == [False] * len(ours)
    assert [path.exists() for path in others] == [True] * len(others)


def test_rows_come_back_with_the_time_their_files_were_listed(tmp_path):
    """A chunk keeps its run's walk time; a finished FILE's rows take the time in its summary,
    but rows under folders that run could not list are checked again (0); without a summary,
    every row is (0). A later chunk's row of a path replaces FILE's."""
    out = tmp_path / "scores.jsonl"
    store = ChunkStore(out, "jsonl", JOB, 111)
    store.open(overwrite=False)
    store.write(some_rows(["a.png", "locked/b.png"]).table())

    def summary() -> None:
        summary_path = companions(out)[0]
        summary_path.write_text(
            json.dumps({**JOB, "listed_at_ns": 222, "unreadable_folders": ["locked"]})
        )

    store.finish(some_rows(["a.png", "locked/b.png", "c.png"]).table(), summary)
    assert not store.parts.exists()
    second = ChunkStore(out, "jsonl", JOB, 333)
    done = second.open(overwrite=False)
    assert dict(zip(done["path"].to_pylist(), done[VALID_SINCE].to_pylist(), strict=True)) == {
        "a.png": 222, "locked/b.png": 0, "c.png": 222,
    }  # fmt: skip
    second.write(some_rows(["c.png"]).table())
    second.close()
    third = ChunkStore(out, "jsonl", JOB, 444)
    done = third.open(overwrite=False)
    third.close()
    assert done["path"].to_pylist() == ["a.png", "locked/b.png", "c.png"]
    assert done[VALID_SINCE].to_pylist() == [222, 0, 333]
    companions(out)[0].unlink()
    for chunk in (out.parent / "scores.jsonl.parts").glob("chunk-*"):
        chunk.unlink()
    done = ChunkStore(out, "jsonl", JOB, 555).open(overwrite=False)
    assert done[VALID_SINCE].to_pylist() == [0, 0, 0]


def test_one_job_per_output_and_no_mixing_of_settings(tmp_path):
    out = tmp_path / "scores.csv"
    running = ChunkStore(out, "csv", JOB, 0)
    running.open(overwrite=False)
    with pytest.raises(ScoringError, match="another scoring job is writing"):
        ChunkStore(out, "csv", JOB, 0).open(overwrite=False)
    running.write(some_rows(["a.png"]).table())
    running.close()
    with pytest.raises(ScoringError, match=r"version 3 -> 4.*--overwrite"):
        ChunkStore(out, "csv", {**JOB, "version": 4}, 0).open(overwrite=False)
    fresh = ChunkStore(out, "csv", {**JOB, "version": 4}, 0)
    assert fresh.open(overwrite=True).num_rows == 0
    fresh.close()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_every_format_round_trips_rows_exactly(fmt, tmp_path):
    rows = some_rows(["x/ü 1.png", 'quote",comma.png'], ["bad.png"]).table()
    out = tmp_path / f"scores.{fmt}"
    tables.write(rows, out, fmt)
    assert tables.read(out, fmt).equals(rows)


def test_walk_order_links_and_class_folders(tmp_path):
    for relative in ("b/2.png", "b/10.PNG", "a/x.jpg", "a/notes.txt", "z.gif"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    (tmp_path / "0-link").symlink_to("b")  # sorts first, but b is walked under its real name
    (tmp_path / "a" / "up").symlink_to("..")
    found = walk(tmp_path)
    assert [i.key for i in found.items] == ["a/x.jpg", "b/10.PNG", "b/2.png", "z.gif"]
    assert found.skipped == 1
    assert [i.key for i in walk(tmp_path, recursive=False).items] == ["z.gif"]
    matcher = label_matcher(LABELS)
    assert true_label(Item("t/1.png", "", "T-shirt-top"), matcher) == "T-shirt/top"
    assert true_label(Item("t/1.png", "", "ankle_BOOT"), matcher) == "Ankle boot"
    assert true_label(Item("1.png", "", ""), matcher) is None
    assert true_label(Item("s/1.png", "", "sandal"), matcher) is None


def test_retrying_waits_out_unavailable_and_gives_up_on_the_rest():
    import grpc

    from service.client import ClientError
    from service.scoring import engines

    pauses: list[float] = []

    class Stop:  # records the pauses instead of waiting
        stopped = False

        def wait(self, seconds):
            pauses.append(seconds)
            return self.stopped

        def is_set(self):
            return self.stopped

    stop = Stop()
    answers = iter(
        [
            ClientError(grpc.StatusCode.UNAVAILABLE, "down"),
            ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
            "done",
        ]
    )

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert engines.retrying(call, 5, "--server s:1", stop) == "done"
    assert pauses == [0.1, 0.2]
    with pytest.raises(ScoringError, match="--server s:1: INVALID_ARGUMENT: no"):
        engines.retrying(_raise(grpc.StatusCode.INVALID_ARGUMENT, "no"), 5, "--server s:1", stop)
    with pytest.raises(ScoringError, match="UNAVAILABLE"):
        engines.retrying(_raise(grpc.StatusCode.UNAVAILABLE, "down"), 3, "--server s:1", stop)
    assert pauses[2:] == [0.1, 0.2, 0.4]  # then it gives up
    stop.stopped = True  # the job is stopping: no more retries
    with pytest.raises(ScoringError, match="UNAVAILABLE"):
        engines.retrying(_raise(grpc.StatusCode.UNAVAILABLE, "down"), 3, "--server s:1", stop)
    assert pauses[5:] == []
    with pytest.raises(ClientError):  # too large: the caller splits the request
        message = "Received message larger than max (9 vs. 4)"
        engines.retrying(_raise(grpc.StatusCode.RESOURCE_EXHAUSTED, message), 3, "s", stop)


def test_images_refused_while_the_servers_decoding_is_busy_are_sent_again(tmp_path):
    """Remote scoring: a file the server's decode budget turned away for now ("retry later")
    is sent again, alone, until it is scored; one too large for the whole budget stays an
    error row, sent once."""
    from types import SimpleNamespace

    from service.predictions import Prediction
    from service.scoring.engines import RemoteEngine

    where = "model 'm' version 3, image 0: "
    busy = f"{where}image of 3000x3000 RGB PNG needs about 34 MiB ... now: retry later"
    never = f"{where}image of 4000x4000 RGB PNG needs about 61 MiB ...: send a smaller image"

    class Server:
        target = "s:1"

        def __init__(self):
            self.sent: list[list[bytes]] = []

        def get_model(self, model, version):
            shape, providers = (28, 28, 1), ("CPU",)
            return SimpleNamespace(
                name=model, version=version, labels=LABELS, input_shape=shape,
                execution_providers=providers, bottleneck_map=None,
            )  # fmt: skip

        def classify(self, images, model, version, top_k):
            self.sent.append(list(images))
            return [self._answer(i, data) for i, data in enumerate(images)]

        def _answer(self, index, data):
            if data == b"big" or (data == b"busy" and len(self.sent) < 3):
                error = never if data == b"big" else busy
                return Prediction(index, "m", 3, error_code="RESOURCE_EXHAUSTED", error=error)
            return Prediction(index, "m", 3, label="Trouser", probabilities=(0.2, 0.7, 0.1))

    items = []
    for name in ("ok", "busy", "big"):
        (tmp_path / f"{name}.png").write_bytes(name.encode())
        items.append(Item(f"{name}.png", str(tmp_path / f"{name}.png"), ""))
    server = Server()
    engine = RemoteEngine(server, "m", 3, workers=1, batch_size=8, max_message_bytes=1 << 20)
    try:
        [result] = list(engine.score(items))
    finally:
        engine.close()
    assert server.sent == [[b"ok", b"busy", b"big"], [b"busy"], [b"busy"]]
    assert result.keys == ["ok.png", "busy.png"]
    assert result.errors == [("big.png", never.removeprefix(where))]


def _raise(code, message):
    from service.client import ClientError

    def call():
        raise ClientError(code, message)

    return call


def test_walk_goes_deeper_than_the_python_stack_and_matches_any_script(tmp_path):
    folder = tmp_path
    for _ in range(1200):  # (pathlib's mkdir(parents=True) itself recurses too deep)
        folder = folder / "d"
        folder.mkdir()
    (folder / "deep.png").write_bytes(b"")
    try:
        assert [i.key for i in walk(tmp_path).items] == ["d/" * 1200 + "deep.png"]
    finally:  # bottom up: shutil.rmtree (and so pytest's clean-up) recurses too deep
        (folder / "deep.png").unlink()
        while folder != tmp_path:
            folder.rmdir()
            folder = folder.parent
    matcher = label_matcher(("猫", "犬", "!!!"))
    assert true_label(Item("犬/1.png", "", "犬"), matcher) == "犬"
    assert true_label(Item("写真/1.png", "", "写真"), matcher) is None
    assert true_label(Item("x/1.png", "", "???"), matcher) is None
