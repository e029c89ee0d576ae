"""msgpack <-> message objects: the only place bus payloads are built or parsed.

Decoding validates every field against the dataclass type hints in `messages`, so a
subscriber either gets a well-typed message or a `BusDecodeError` it can count and drop.
The supported hint shapes are the ones `messages` uses: str, int, float, bool, `X | None`,
`list[X]`, `Literal[...]` of strings (checked by value: the fixed vocabulary, so that no
other string can reach, say, the kubelet's health field), nested dataclasses, and `DeviceId`
(a str that must have a device ID's form).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from common.bus.messages import BY_TOPIC, DEVICE_ID_PATTERN, SCHEMA_VERSION, IdForm, Message, is_device_id

# A full state of a large node (hundreds of MIG devices and replicas) is well under this;
# anything bigger is abuse, and refusing it before unpacking bounds the memory it costs.
MAX_PAYLOAD = 4 * 1024 * 1024


class BusDecodeError(ValueError):
    """A payload that is not a valid message of a known topic and schema version."""


def encode(msg: Message) -> tuple[bytes, bytes]:
    body = _to_wire(msg)
    body["v"] = SCHEMA_VERSION
    return msg.TOPIC.encode("ascii"), msgpack.packb(body, use_bin_type=True)


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field, holds dataclasses) per field: only those need walking."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        out.append((f.name, any(dataclasses.is_dataclass(a) for a in args)))
    return tuple(out)


def _to_wire(obj: Any) -> dict[str, Any]:
    # dataclasses.asdict deep-copies every value; a state goes out on every change and
    # heartbeat, so build the plain dict directly, walking only the nested fields.
    out: dict[str, Any] = {}
    cls: type = obj.__class__
    for name, nested in _plan(cls):
        value = getattr(obj, name)
        if nested and value is not None:  # None: an optional nested field (`X | None`) left unset
            value = [_to_wire(v) for v in value] if isinstance(value, list) else _to_wire(value)
        out[name] = value
    return out


# How encode() writes a state's send time: the key, then a msgpack float64 (8 bytes follow).
_SENT_AT = b"\xa7sent_at\xcb"


def resent_at(held: bytes, payload: bytes) -> float | None:
    """The send time in `payload` when it is `held` (a payload already decoded and checked)
    sent again with only a new time, byte for byte otherwise: a heartbeat or a replay, which a
    subscriber need not decode again (~0.1-0.4 ms a second per publisher). None when anything
    else differs: the payload is then decoded, and dropped if it is bad."""
    at = held.find(_SENT_AT)
    if at < 0 or len(payload) != len(held):
        return None
    value = at + len(_SENT_AT)
    if payload[:value] != held[:value] or payload[value + 8:] != held[value + 8:]:
        return None
    sent: float = struct.unpack_from(">d", payload, value)[0]
    return sent


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
    try:
        msg = _build(cls, body)
    except _Invalid as e:
        raise BusDecodeError(f"{name}{e.where}: {e.why}") from None
    assert isinstance(msg, Message)
    return msg


class _Invalid(Exception):
    """A field that fails its check. Where it is (`.devices[3].id`) is put together on the way
    out, so that a valid message, decoded on every state and heartbeat, formats no paths."""

    def __init__(self, why: str) -> None:
        self.where = ""
        self.why = why


Checker = Callable[[Any], Any]


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Checker, bool], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple(
        (
            f.name,
            _checker(hints[f.name]),
            (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            or bool(f.metadata.get("required")),
        )
        for f in dataclasses.fields(cls)
    )


def _build(cls: type, body: Any) -> Any:
    return _builder(cls)(body)


_INLINE_CHECKS = {
    str: ("if v.__class__ is not str:", "expected str"),
    bool: ("if v.__class__ is not bool:", "expected bool"),
    int: ("if v.__class__ is not int:", "expected an integer"),  # bool's class is not int
}


@functools.cache
def _builder(cls: type) -> Callable[[Any], Any]:
    """A decoder made for `cls`: each field checked inline where its type is plain (str, bool,
    int, float), by its checker otherwise, and set on a new instance directly. The generic
    loop it replaces cost ~5 us per object, and a health state of 16 GPUs carries 120 links.
    Same checks and messages as the checkers (`_checker`), which nested types still use."""
    if hasattr(cls, "__post_init__") or "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: bus messages are plain dataclasses (no __post_init__, no slots)")
    hints = typing.get_type_hints(cls, include_extras=True)
    env: dict[str, Any] = {"_Invalid": _Invalid, "_at": _at, "_new": object.__new__, "_cls": cls,
                           "_id": _ID.fullmatch, "_not_id": _not_id}
    lines = ["def build(body):",
             "    if not isinstance(body, dict):",
             "        raise _Invalid('expected a map')",
             "    o = _new(_cls)",
             "    d = o.__dict__"]
    for i, ((name, check, required), f) in enumerate(zip(_fields(cls), dataclasses.fields(cls), strict=True)):
        hint = hints[name]
        lines += [f"    if {name!r} in body:", f"        v = body[{name!r}]"]
        if hint in _INLINE_CHECKS:
            test, why = _INLINE_CHECKS[hint]
            lines += [f"        {test}", f"            raise _at({'.' + name!r}, {why!r})"]
        elif typing.get_origin(hint) is typing.Annotated:  # a device ID
            (form,) = [m for m in typing.get_args(hint)[1:] if isinstance(m, IdForm)]
            lines += ["        if v.__class__ is not str:", f"            raise _at({'.' + name!r}, 'expected str')",
                      f"        if _id(v) is None{' and v' if form.empty_ok else ''}:",
                      f"            raise _at({'.' + name!r}, _not_id(v))"]
        elif hint is float:
            lines += ["        if v.__class__ is not float:",
                      "            if v.__class__ is not int:",
                      f"                raise _at({'.' + name!r}, 'expected a number')",
                      "            v = float(v)"]
        else:
            env[f"c{i}"] = check
            lines += ["        try:", f"            v = c{i}(v)", "        except _Invalid as e:",
                      f"            e.where = {'.' + name!r} + e.where", "            raise"]
        lines += [f"        d[{name!r}] = v", "    else:"]
        if required:
            lines.append(f"        raise _Invalid({f'missing field {name!r}'!r})")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"f{i}"] = f.default_factory
            lines.append(f"        d[{name!r}] = f{i}()")
        else:
            env[f"d{i}"] = f.default
            lines.append(f"        d[{name!r}] = d{i}")
    lines.append("    return o")
    exec(compile("\n".join(lines), f"<bus decoder of {cls.__name__}>", "exec"), env)
    built: Callable[[Any], Any] = env["build"]
    return built


_ID = re.compile(DEVICE_ID_PATTERN)


def _not_id(text: str) -> str:
    shown = text if len(text) <= 64 else text[:64] + "..."
    return f"not a device ID: {shown!r} ({len(text)} characters)"


def _at(where: str, why: str) -> _Invalid:
    e = _Invalid(why)
    e.where = where
    return e


def _checker(hint: Any) -> Checker:
    """A validating converter for one type hint, built once per field (decoding is hot)."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *marks = typing.get_args(hint)
        (form,) = [m for m in marks if isinstance(m, IdForm)]
        check_str = _checker(base)
        empty_ok = form.empty_ok

        def device_id(value: Any) -> str:
            text: str = check_str(value)
            if (empty_ok and text == "") or is_device_id(text):
                return text
            raise _Invalid(_not_id(text))

        return device_id
    if origin is types.UnionType or origin is typing.Union:
        args = typing.get_args(hint)
        (inner,) = [a for a in args if a is not type(None)]
        check = _checker(inner)

        def optional(value: Any) -> Any:
            return None if value is None else check(value)

        return optional
    if origin is typing.Literal:
        allowed = frozenset(typing.get_args(hint))
        if not all(isinstance(a, str) for a in allowed):
            raise TypeError(f"only string literals are supported in bus messages, not {hint!r}")
        shown = "|".join(sorted(allowed))

        def literal(value: Any) -> str:
            if not isinstance(value, str) or value not in allowed:
                raise _Invalid(f"expected one of {shown}, got {str(value)[:32]!r}")
            return value

        return literal
    if origin is list:
        (inner,) = typing.get_args(hint)
        item = _checker(inner)

        def checked_list(value: Any) -> Any:
            if not isinstance(value, list):
                raise _Invalid("expected a list")
            try:
                return [item(v) for v in value]
            except _Invalid as e:
                bad = next(i for i, v in enumerate(value) if _fails(item, v))
                e.where = f"[{bad}]{e.where}"
                raise

        return checked_list
    if dataclasses.is_dataclass(hint):
        cls = typing.cast(type, hint)
        return _builder(cls)
    if hint is float:

        def number(value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _Invalid("expected a number")
            return float(value)

        return number
    if hint is int:

        def integer(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _Invalid("expected an integer")
            return value

        return integer
    if hint in (str, bool):

        def exact(value: Any) -> Any:
            if not isinstance(value, hint):
                raise _Invalid(f"expected {hint.__name__}")
            return value

        return exact
    raise TypeError(f"unsupported field type {hint!r} in a bus message")


def _fails(check: Checker, value: Any) -> bool:
    try:
        check(value)
    except _Invalid:
        return True
    return False
