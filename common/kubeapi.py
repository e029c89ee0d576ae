"""The Kubernetes API as every process of ours that talks to it does: found and authenticated by
the client library, every answer read within a bound and refused when it is not what was asked.

The client library (lightkube) is used for what it does well, finding the cluster and
authenticating (in-cluster token rotation, exec plugins, TLS); its reading is not: it read a body
whole before any check (a 200 MB Node cost the kube-agent 456 MB at the peak) and its models turn
any object into the one asked for. Here a body is read up to MAX_ANSWER_BYTES (refused by its
declared length before any of it is read), uncompressed (identity: the bound is on the bytes
received, and a compressed body could expand past it), must be JSON, and an error answer becomes
an ApiStatus carrying the Status's code and message. What the object must hold is the caller's to
check: it raises BadAnswer, a failed read like an unreachable server.

Only this module imports the client library (an import contract says so): the processes that
never talk to the API do not pay for it.
"""

from __future__ import annotations

import asyncio
import json
import reprlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from typing import Any

import httpx2
from lightkube import KubeConfig
from lightkube.config import client_adapter
from lightkube.core.exceptions import ConfigError

__all__ = [
    "MAX_ANSWER_BYTES",
    "READ_ERRORS",
    "REQUEST_S",
    "RETRY_AFTER_MAX_S",
    "WATCH_TIMEOUT",
    "ApiStatus",
    "Backoff",
    "BadAnswer",
    "ClientFactory",
    "ConfigError",
    "Http",
    "default_client",
    "json_type",
    "plain",
    "reason",
    "retry_pause",
    "rfc3339",
    "show",
    "wait_event",
]

# What one answer (a GET, a list, one watch event) may hold. The API server stores no object
# larger than etcd's request limit (1.5 MiB by default), and a Node is a few KB to ~100 KB
# (images and conditions in its status): 8 MiB leaves room for a cluster that raised the limit,
# and bounds what a wrong answer costs to about that, read and refused.
MAX_ANSWER_BYTES = 8 << 20
REQUEST_S = 10.0  # connect, and each read (the client library's default)
READ_S = 60.0  # one answer, whole: a server trickling bytes cannot hold a caller longer
# A watch is silent while nothing changes: no read timeout (the caller bounds the whole watch).
WATCH_TIMEOUT = httpx2.Timeout(REQUEST_S, read=None)
# A server's Retry-After above this is not waited out whole: it is asked again after this long (a
# wrong or hostile value must not park a writer for hours).
RETRY_AFTER_MAX_S = 60.0
Http = httpx2.AsyncClient
ClientFactory = Callable[[], httpx2.AsyncClient]


class BadAnswer(Exception):
    """The server (or whatever answered in its place) answered, but not what was asked: a failed read."""


class ApiStatus(Exception):
    """An HTTP error status or a watch's ERROR event, with the Status's code, reason and message."""

    def __init__(self, code: int, message: str, reason: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code
        self.reason = reason  # the Status's CamelCase reason ("Conflict", "AlreadyExists"); "" if none
        # Seconds the server asks the client to wait (a 429's or 503's Retry-After header, or the Status's
        # details.retryAfterSeconds); None if it said nothing. The caller bounds it.
        self.retry_after = retry_after


# What a request can fail with: none of it ends a process, all of it is retried.
# InvalidURL and StreamError are the HTTP client's own, outside its HTTPError.
READ_ERRORS = (BadAnswer, ApiStatus, ConfigError, httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError,
               OSError)


class _CredentialErrors(httpx2.Auth):
    """The client library's authentication, with what its credential plugin's answer makes it raise
    read as ConfigError. An exec plugin runs at the first request (and on a 401), not when the client
    is made, and lightkube takes the token from its output as `json.loads(out)["status"]["token"]`:
    output that is not that raised JSONDecodeError, KeyError or TypeError at request time, none of
    them a failed read, and ended the caller's task instead of being reported and retried."""

    def __init__(self, inner: httpx2.Auth) -> None:
        self._inner = inner

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        return self._inner.sync_auth_flow(request)  # no sync client is made here (Http is the async one)

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        flow = self._inner.async_auth_flow(request)
        try:
            step: Any = None
            while True:
                try:
                    request = await (flow.__anext__() if step is None else flow.asend(step))
                except StopAsyncIteration:
                    return
                except READ_ERRORS:
                    raise
                except Exception as e:  # the plugin is a program we do not own: anything it makes us raise
                    why = f"the credential plugin's answer is not usable: {type(e).__name__}: {e}"
                    raise ConfigError(why) from e
                step = yield request
        finally:
            await flow.aclose()


def default_client(kubeconfig: str = "") -> httpx2.AsyncClient:
    """In-cluster (the pod's service account), else KUBECONFIG, as kubectl finds its cluster; or the
    kubeconfig file named (a command's --kubeconfig flag: NVIDIA's commands take that file first)."""
    try:
        config = (KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()).get()
        if config is None:
            raise ConfigError("the kubeconfig names no context")
        client = client_adapter.AsyncClient(config, client_adapter.ConnectionParams(timeout=httpx2.Timeout(REQUEST_S)))
    except ConfigError:
        raise
    except Exception as e:  # a kubeconfig is a file we do not own: whatever its parser raises means "no access"
        raise ConfigError(f"{type(e).__name__}: {e}") from e
    if client.auth is not None:
        client.auth = _CredentialErrors(client.auth)
    return client


def rfc3339(t: float) -> str:
    """A unix time in metav1.Time's form: seconds, UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def retry_pause(pause: float, e: BaseException) -> float:
    """The wait before the next try after `e`: the caller's growing pause, or what the server asked
    for (a 429's or 503's Retry-After), whichever is longer, up to RETRY_AFTER_MAX_S."""
    if isinstance(e, ApiStatus) and e.retry_after is not None:
        return min(max(pause, e.retry_after), RETRY_AFTER_MAX_S)
    return pause


class Backoff:
    """The pause between tries of a request that keeps failing, as every writer and reader of the API
    here retries: `min_s` after the first failure, doubled after each one up to `max_s`, back to
    `min_s` after a success (what counts as one is the caller's: a write taken, a watch event)."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.pause = min_s  # the wait after the next failure (before a server's Retry-After)

    @property
    def fresh(self) -> bool:
        """No failure since the start or the last success."""
        return self.pause == self.min_s

    def failed(self, e: BaseException | None = None) -> float:
        """The wait before the next try, and the pause doubled for the failure after it. With the
        failure `e`, a server's Retry-After is honoured (retry_pause); without, the pause is the wait."""
        wait = self.pause if e is None else retry_pause(self.pause, e)
        self.pause = min(self.pause * 2, self.max_s)
        return wait

    def succeeded(self) -> None:
        self.pause = self.min_s


async def wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Until `event` is set or `timeout` seconds passed (None: no limit). Clearing it is the caller's."""
    try:
        async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        pass


def reason(e: BaseException) -> str:
    """A failed request in a line for the log and the bus (bounded: an answer's text can be quoted)."""
    if isinstance(e, BadAnswer):
        text = f"answer refused: {e}"
    elif isinstance(e, ApiStatus):
        text = str(e)
    elif isinstance(e, ConfigError):
        text = f"no API access configured: {e}"
    else:
        text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 400 else text[:400] + "..."


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80


def show(value: Any) -> str:
    """A value from an answer, quoted (control characters escaped: no forged log line) and cut short."""
    return _SHOW.repr(value)


def plain(message: str) -> str:
    """A server's message, as `show` but without the quotes."""
    return show(message)[1:-1]


def json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def kind_of(answer: Any) -> str:
    """What an answer is, for a message: its kind where it has one."""
    if isinstance(answer, dict) and "kind" in answer:
        return f"a {show(answer['kind'])}"
    return json_type(answer)


HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


def identity(resp: httpx2.Response, what: str) -> None:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadAnswer(f"{what}: Content-Encoding {show(encoding)}, where identity was asked for")


async def body_of(resp: httpx2.Response, what: str, limit: int = MAX_ANSWER_BYTES) -> bytearray:
    """The body, refused past the bound: by its declared length before any of it is read, else as
    soon as it is longer."""
    identity(resp, what)
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadAnswer(f"{what}: {declared} bytes, larger than {limit} bytes")
    body = bytearray()
    async for chunk in resp.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise BadAnswer(f"{what}: larger than {limit} bytes")
    return body


async def lines_of(resp: httpx2.Response, what: str, limit: int = MAX_ANSWER_BYTES) -> AsyncIterator[bytes]:
    """A watch's events, one per line; a line is refused past the bound (the client library's
    line reader held a line of any length)."""
    identity(resp, what)
    pending = bytearray()
    async for chunk in resp.aiter_raw():
        start = len(pending)  # only the new bytes are searched for the end of a line
        pending += chunk
        while (end := pending.find(b"\n", start)) >= 0:
            line = bytes(pending[:end])
            del pending[:end + 1]
            start = 0
            if len(line) > limit:
                raise BadAnswer(f"{what}: an event larger than {limit} bytes")
            if line.strip():
                yield line
        if len(pending) > limit:
            raise BadAnswer(f"{what}: an event larger than {limit} bytes")
    if pending.strip():
        yield bytes(pending)


def parse_json(body: bytes | bytearray, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadAnswer(f"{what}: not JSON ({e})") from None


def status_of(code: int, phrase: str, body: bytes | bytearray, retry_after: str = "") -> ApiStatus:
    """An error answer's Status message and reason, where it has them, and the wait it asks for
    (`retry_after`: the Retry-After header; the API server sends seconds, an HTTP date is ignored)."""
    message, why = phrase, ""
    wait = float(retry_after.strip()) if retry_after.strip().isdigit() else None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict):
        if isinstance(answer.get("message"), str):
            message = answer["message"]
        if isinstance(answer.get("reason"), str):
            why = plain(answer["reason"])
        details = answer.get("details")
        seconds = details.get("retryAfterSeconds") if isinstance(details, dict) else None
        if wait is None and isinstance(seconds, int) and not isinstance(seconds, bool) and seconds >= 0:
            wait = float(seconds)
    return ApiStatus(code, plain(message), why, wait)


async def request(http: httpx2.AsyncClient, method: str, path: str, what: str, *,
                  params: dict[str, str] | None = None, body: Any = None, content_type: str = "application/json",
                  limit: int = MAX_ANSWER_BYTES) -> Any:
    """One request, its JSON answer read within the bounds; any status but 2xx raises ApiStatus.
    `body` is sent as JSON with `content_type` (a patch names its kind of merge there)."""
    headers = dict(HEADERS)
    content = None
    if body is not None:
        content = json.dumps(body, separators=(",", ":")).encode()
        headers["Content-Type"] = content_type
    try:
        async with asyncio.timeout(READ_S):
            async with http.stream(method, path, params=params or {}, headers=headers, content=content) as resp:
                data = await body_of(resp, what, limit)
    except TimeoutError:
        raise BadAnswer(f"{what}: no complete answer within {READ_S:.0f} s") from None
    if not 200 <= resp.status_code < 300:
        raise status_of(resp.status_code, resp.reason_phrase, data, resp.headers.get("retry-after", ""))
    return parse_json(data, what)
