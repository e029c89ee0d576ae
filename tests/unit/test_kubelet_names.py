"""The kubelet simulator accepts exactly the resource names the kubelet's Register accepts."""

from __future__ import annotations

import pytest

from devtools.kubelet_simulator.simulator import is_extended_resource_name

NAMES: list[tuple[str, bool]] = [
    ("nvidia.com/gpu", True),
    ("nvidia.com/gpu.shared", True),
    ("nvidia.com/mig-1g.10gb", True),
    ("nvidia.com/mig-3g.40gb", True),
    ("example.com/a_b", True),
    ("example.com/A", True),
    ("example.com/" + "a" * 63, True),
    ("example.com/" + "a" * 64, False),
    ("gpu", False),
    ("nvidia.com", False),
    ("kubernetes.io/foo", False),
    ("node.kubernetes.io/foo", False),
    ("requests.nvidia.com/gpu", False),
    ("nvidia.com/", False),
    ("/gpu", False),
    ("", False),
    ("nvidia.com/-gpu", False),
    ("nvidia.com/gpu-", False),
    ("nvidia.com/gpu.", False),
    ("nvidia.com/g pu", False),
    ("nvidia.com/gpu/0", False),
    # The domain must be a DNS-1123 subdomain ("requests." + domain, at most 253 characters),
    # as k8s validation.IsQualifiedName checks it after prefixing "requests.".
    ("NVIDIA.com/gpu", False),
    ("nvidia_corp.com/gpu", False),
    ("-nvidia.com/gpu", False),
    ("nvidia..com/gpu", False),
    ("nvidia.com./gpu", False),
    ("a" * 250 + ".com/gpu", False),
    ("a" * 240 + ".com/gpu", True),
]


IDS = [(n or "<empty>") if len(n) < 40 else n[:20] + f"...{len(n)}" for n, _ in NAMES]


@pytest.mark.parametrize(("name", "ok"), NAMES, ids=IDS)
def test_is_extended_resource_name(name: str, ok: bool) -> None:
    assert is_extended_resource_name(name) is ok
