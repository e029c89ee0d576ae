"""msgpack <-> message objects: the only place bus payloads are built or parsed.

Decoding validates every field against the dataclass type hints in `messages`, so a
subscriber either gets a well-typed message or a `BusDecodeError` it can count and drop.
The supported hint shapes are the ones `messages` uses: str, int, float, bool, `X | None`,
`list[X]` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

import msgpack

from common.bus.messages import BY_TOPIC, SCHEMA_VERSION, Message

# A full state of a large node (hundreds of MIG devices and replicas) is well under this;
# anything bigger is abuse, and refusing it before unpacking bounds the memory it costs.
MAX_PAYLOAD = 4 * 1024 * 1024


class BusDecodeError(ValueError):
    """A payload that is not a valid message of a known topic and schema version."""


def encode(msg: Message) -> tuple[bytes, bytes]:
    body = dataclasses.asdict(msg)
    body["v"] = SCHEMA_VERSION
    return msg.TOPIC.encode("ascii"), msgpack.packb(body, use_bin_type=True)


def decode(topic: bytes, payload: bytes) -> Message:
    try:
        name = topic.decode("ascii")
    except UnicodeDecodeError:
        raise BusDecodeError("topic is not ASCII") from None
    cls = BY_TOPIC.get(name)
    if cls is None:
        raise BusDecodeError(f"unknown topic {name[:64]!r}")
    if len(payload) > MAX_PAYLOAD:
        raise BusDecodeError(f"{name}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BusDecodeError(f"{name}: not msgpack: {e}") from e
    if not isinstance(body, dict):
        raise BusDecodeError(f"{name}: payload is not a map")
    version = body.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # True and 1.0 are not 1 here
        raise BusDecodeError(f"{name}: schema version {version!r}, expected {SCHEMA_VERSION}")
    msg = _build(cls, body, name)
    assert isinstance(msg, Message)
    return msg


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def _build(cls: type, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise BusDecodeError(f"{where}: expected a map")
    kwargs: dict[str, Any] = {}
    for name, hint, required in _fields(cls):
        if name not in body:
            if required:
                raise BusDecodeError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _check(hint, body[name], f"{where}.{name}")
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise BusDecodeError(f"{where}: expected a list")
        (inner,) = typing.get_args(hint)
        return [_check(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BusDecodeError(f"{where}: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BusDecodeError(f"{where}: expected an integer")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise BusDecodeError(f"{where}: expected {hint.__name__}")
        return value
    raise BusDecodeError(f"{where}: unsupported field type {hint!r}")
