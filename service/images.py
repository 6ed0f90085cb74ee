"""Images for the service: encoded files through the one image policy (imaging/policy.py, the
same function training decodes its folders with), raw pixels checked, every refusal as
InvalidInput.

Raw tensors must already be uint8 at the model's (H, W, C); they are checked, not resized.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from imaging import policy
from service.errors import InvalidInput
from service.memory import DecodeBudget


def decode(
    data: bytes | BinaryIO,
    shape: tuple[int, int, int],
    max_pixels: int,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """`imaging.policy.decode`: one encoded image (bytes or an open binary file) -> `shape` =
    (H, W, C) uint8; raises InvalidInput, and DecodeBudgetExceeded, before decoding, when its
    estimated peak memory does not fit in `budget`."""
    try:
        return policy.decode(data, shape, max_pixels, budget)
    except policy.ImageError as exc:
        raise InvalidInput(str(exc)) from exc


def check_tensor(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A raw (H, W, C) or (N, H, W, C) uint8 tensor of the model's shape, else InvalidInput."""
    if array.dtype != np.uint8:
        raise InvalidInput(f"raw pixels must be uint8, got {array.dtype}")
    if array.shape[-3:] != shape or array.ndim not in (3, 4):
        raise InvalidInput(
            f"raw pixels must have shape (H, W, C) = {shape}, got {tuple(array.shape)}"
        )
    return array


def tensor_from_bytes(
    data: bytes, shape: tuple[int, int, int], expected: tuple[int, int, int]
) -> np.ndarray:
    """Raw uint8 pixel bytes said to be of `shape` -> (H, W, C) array; raises InvalidInput
    unless `shape` is the model's `expected` shape and the byte count matches."""
    if shape != expected:
        raise InvalidInput(f"raw pixels must have shape (H, W, C) = {expected}, got {shape}")
    size = shape[0] * shape[1] * shape[2]
    if len(data) != size:
        raise InvalidInput(
            f"raw pixels: expected {size:,} bytes for (H, W, C) = {shape}, got {len(data):,}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)
