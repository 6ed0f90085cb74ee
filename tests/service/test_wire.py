"""The bounded wire walk before a large request is parsed (service/servicers/wire.py)."""

from __future__ import annotations

import pytest

from service._proto.classifier.v1 import classifier_pb2 as cpb
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service.servicers.wire import LOOK_FROM_BYTES, TooManyFields, check_fields

BUDGET = 8 * 1024 + 1024  # the server's, at the default --max-queue-size 1024


def test_the_largest_useful_requests_fit_the_budget() -> None:
    classify = cpb.ClassifyRequest(model="fashion")
    for _ in range(1024):  # --max-queue-size raw tensors, each with an id
        tensor = cpb.Tensor(height=28, width=28, channels=1, data=bytes(784))
        classify.images.add(id="x", tensor=tensor)
    files = pb.ModelInferRequest(model_name="fashion")
    files.inputs.add(name="images", datatype="BYTES", shape=[1024])
    files.inputs[0].contents.bytes_contents.extend([bytes(100)] * 1024)
    for message in (classify, files):
        check_fields(message.SerializeToString(), message.DESCRIPTOR, BUDGET)


def test_many_small_fields_are_refused_whatever_level_they_are_at() -> None:
    top = pb.ModelInferRequest(model_name="fashion")
    for i in range(BUDGET):
        top.parameters[f"p{i}"].bool_param = True
    nested = pb.ModelInferRequest(model_name="fashion")
    nested.outputs.add(name="probabilities")
    for i in range(BUDGET):
        nested.outputs[0].parameters[f"p{i}"].int64_param = i
    for message in (top, nested):
        with pytest.raises(TooManyFields):
            check_fields(message.SerializeToString(), message.DESCRIPTOR, BUDGET)


def test_small_requests_and_what_is_not_protobuf_are_left_to_the_parser() -> None:
    small = pb.ModelInferRequest(model_name="fashion")
    for i in range(3000):  # over a small budget, but under LOOK_FROM_BYTES: parsed as is
        small.parameters[f"{i}"].bool_param = True
    assert len(small.SerializeToString()) < LOOK_FROM_BYTES
    check_fields(small.SerializeToString(), small.DESCRIPTOR, 10)
    for junk in (b"\xff" * LOOK_FROM_BYTES, b"\x0a\xff\xff\xff\xff" + bytes(LOOK_FROM_BYTES)):
        check_fields(junk, pb.ModelInferRequest.DESCRIPTOR, 10)  # no error of its own
