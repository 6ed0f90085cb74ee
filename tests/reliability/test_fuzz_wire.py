"""Byte-level fuzz against one real server (in each server mode): random bytes, and real
requests cut, bit-flipped or spliced, sent as the serialized request of every method of our two
services, of grpc.health.v1.Health/Check and of server reflection.

Bytes that parse as the method's request type are answered like any request (OK or a client
error); bytes that do not are INVALID_ARGUMENT, and in a stream fail only their own message.
After each example the server still answers health SERVING and has logged no traceback."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import event, example, given
from hypothesis import strategies as st

from service._proto.classifier.v1 import classifier_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2 as v2
from tests.conftest import MODEL
from tests.reliability.conftest import TIMEOUT_S, Fuzzed, share
from tests.reliability.test_fuzz_requests import (
    ALLOWED,
    INT64,
    TEXT,
    Code,
    check_message,
    classify_requests,
    outcome,
    v2_requests,
)

GARBAGE = b"\xff\xff\xff"  # field 31 with wire type 7: no message of any type parses from it
MALFORMED = "not a valid protobuf message"
SERVICES = (
    pb.DESCRIPTOR.services_by_name["Classifier"],
    v2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
)
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WORDS = st.sampled_from([MODEL, "1", "", "classifier.v1.Classifier", "grpc.health.v1.Health",
                         "inference.GRPCInferenceService", "*"]) | TEXT  # fmt: skip


def parses(cls, data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


@st.composite
def simple_messages(draw, cls) -> bytes:
    """A serialized `cls` with its singular string and integer fields drawn (names the
    server knows, or any text; small or extreme integers)."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.is_repeated or field.type == FieldDescriptor.TYPE_MESSAGE or draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, draw(WORDS))
        elif field.type == FieldDescriptor.TYPE_INT64:
            setattr(message, field.name, draw(st.sampled_from([0, 1]) | INT64))
    return message.SerializeToString(deterministic=True)


def seeds(cls) -> st.SearchStrategy[bytes]:
    """Real requests of type `cls`, serialized (deterministically: map entries in a fixed
    order, so that the same example mutates the same bytes on every run)."""
    if cls is v2.ModelInferRequest:
        return v2_requests().map(lambda case: case.request.SerializeToString(deterministic=True))
    if cls is pb.ClassifyRequest:
        return classify_requests().map(
            lambda case: case.request.SerializeToString(deterministic=True)
        )
    return simple_messages(cls)


@st.composite
def wire_messages(draw, cls) -> bytes:
    """Random bytes, or a real `cls` request cut, bit-flipped, spliced with random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(seeds(cls)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["cut", "flip", "insert"]))
        if change == "cut":
            del data[at:]
        elif change == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def identity(data: bytes) -> bytes:
    return data


def unary(fuzzed: Fuzzed, method: str, data: bytes) -> tuple[Code, str]:
    call = fuzzed.channel.unary_unary(
        method, request_serializer=identity, response_deserializer=identity
    )
    try:
        call(data, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


def streamed(fuzzed: Fuzzed, method: str, messages: list[bytes]) -> tuple[Code, str, list]:
    call = fuzzed.channel.stream_stream(
        method, request_serializer=identity, response_deserializer=identity
    )
    answers: list[bytes] = []
    try:
        answers.extend(call(iter(messages), timeout=TIMEOUT_S))
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", answers
    return Code.OK, "", answers


# The fuzzed server polls its repository: a load or unload that parses is refused as such.
CONTROL = (v2.RepositoryModelLoadRequest, v2.RepositoryModelUnloadRequest)


def check_unary(cls, data: bytes, code: Code, message: str) -> None:
    event(f"{code.name} {outcome(message)}")
    allowed = ALLOWED + ((Code.FAILED_PRECONDITION,) if cls in CONTROL else ())
    assert code in allowed, f"{code.name}: {message}"
    if not parses(cls, data):
        assert code == Code.INVALID_ARGUMENT and MALFORMED in message, f"{code.name}: {message}"
    if code != Code.OK:
        check_message(message)


def stream_error(method: str, answer: bytes) -> tuple[str, str]:
    """(code name, message) of a stream answer's own error; ("", "") when it has none."""
    if method.endswith("/ClassifyStream"):
        error = pb.ClassifyResponse.FromString(answer).error
        return error.code, error.message
    text = v2.ModelStreamInferResponse.FromString(answer).error_message
    return (text[1:].split("]", 1)[0], text) if text else ("", "")


UNARY = sorted(m for m, d in METHODS.items() if not d.client_streaming)
STREAMS = sorted(m for m, d in METHODS.items() if d.client_streaming)


@pytest.mark.parametrize("method", UNARY)
@share(4)  # one test per method
@given(data=st.data())
def test_fuzz_wire_unary(fuzzed: Fuzzed, method: str, data):
    cls = message_factory.GetMessageClass(METHODS[method].input_type)
    request = data.draw(wire_messages(cls), label="request bytes")
    since = fuzzed.mark()
    code, message = unary(fuzzed, method, request)
    check_unary(cls, request, code, message)
    fuzzed.check_alive(since)


@pytest.mark.parametrize("method", STREAMS)
@share(4)  # one test per method
@given(data=st.data())
def test_fuzz_wire_stream(fuzzed: Fuzzed, method: str, data):
    cls = message_factory.GetMessageClass(METHODS[method].input_type)
    messages = data.draw(st.lists(wire_messages(cls), min_size=1, max_size=3), label="messages")
    since = fuzzed.mark()
    code, message, answers = streamed(fuzzed, method, messages)
    assert code == Code.OK, f"{code.name}: {message}"
    assert len(answers) == len(messages)
    for sent, answer in zip(messages, answers, strict=True):
        name, text = stream_error(method, answer)
        event(f"{name or 'OK'} {outcome(text)}")
        if not parses(cls, sent):
            assert name == "INVALID_ARGUMENT" and MALFORMED in text, text
        if name:
            assert name in {c.name for c in ALLOWED if c != Code.OK}, text
            check_message(text)
    fuzzed.check_alive(since)


@given(request=wire_messages(health_pb2.HealthCheckRequest))
@example(request=GARBAGE)
def test_fuzz_wire_health_check(fuzzed: Fuzzed, request: bytes):
    """Health/Check: OK or NOT_FOUND (an unknown service name) when the bytes parse, else
    INVALID_ARGUMENT (grpc's own answer would be UNKNOWN, with a traceback: issue 14 part 5)."""
    since = fuzzed.mark()
    code, message = unary(fuzzed, HEALTH_CHECK, request)
    if parses(health_pb2.HealthCheckRequest, request):
        assert code in (Code.OK, Code.NOT_FOUND), f"{code.name}: {message}"
    else:
        assert code == Code.INVALID_ARGUMENT, f"{code.name}: {message}"
        check_message(message)
    fuzzed.check_alive(since)


@given(messages=st.lists(wire_messages(reflection_pb2.ServerReflectionRequest), min_size=1,
                         max_size=2))  # fmt: skip
@example(messages=[GARBAGE])
def test_fuzz_wire_reflection(fuzzed: Fuzzed, messages: list[bytes]):
    """ServerReflectionInfo: OK (each answer its own, maybe an error_response) when every
    message parses, else INVALID_ARGUMENT (the stream ends at the first bad message)."""
    since = fuzzed.mark()
    code, message, answers = streamed(fuzzed, REFLECTION, messages)
    if all(parses(reflection_pb2.ServerReflectionRequest, m) for m in messages):
        assert code == Code.OK, f"{code.name}: {message}"
        assert len(answers) == len(messages)
    else:
        assert code == Code.INVALID_ARGUMENT, f"{code.name}: {message}"
        check_message(message)
    fuzzed.check_alive(since)
