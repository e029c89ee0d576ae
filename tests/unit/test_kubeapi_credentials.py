"""common.kubeapi's client and an exec credential plugin (as cloud providers' kubeconfigs name one):
whatever the plugin answers, a request fails with one of READ_ERRORS, which every caller reports and
retries, never with an exception that ends its task. The plugin runs at the first request, so its
answer is read there, not when the client is made."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from common.kubeapi import READ_ERRORS, ConfigError, default_client, request

TOKEN = '{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": {"token": "t"}}'


def kubeconfig(tmp_path: Path, command: str, *args: str) -> str:
    path = tmp_path / "kubeconfig"
    # Port 9 (discard): the request must fail before any connection, at the credentials.
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                  "command": command, "args": list(args)}}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return str(path)


async def get(config: str) -> None:
    http = default_client(config)
    try:
        await request(http, "GET", "/api/v1/nodes/n", "GET of node n")
    finally:
        await http.aclose()


@pytest.mark.parametrize(("output", "raised"), [
    ("not json", "JSONDecodeError"),
    ("{}", "KeyError: 'status'"),
    ("[]", "TypeError"),
    ('{"status": {}}', "KeyError: 'token'"),
])
def test_an_unusable_plugin_answer_is_a_config_error(tmp_path: Path, output: str, raised: str) -> None:
    with pytest.raises(ConfigError, match=f"credential plugin's answer is not usable: {raised}"):
        asyncio.run(get(kubeconfig(tmp_path, "/bin/echo", output)))


def test_a_failing_or_missing_plugin_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="returned 1"):
        asyncio.run(get(kubeconfig(tmp_path, "/bin/false")))
    with pytest.raises(READ_ERRORS):
        asyncio.run(get(kubeconfig(tmp_path, str(tmp_path / "no-such-plugin"))))
    # A usable answer gets as far as the server (none listens on port 9: a connection error).
    with pytest.raises(READ_ERRORS) as e:
        asyncio.run(get(kubeconfig(tmp_path, "/bin/echo", TOKEN)))
    assert not isinstance(e.value, ConfigError)
