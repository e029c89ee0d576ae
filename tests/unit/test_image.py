"""Image hygiene, offline: one version everywhere (pyproject.toml, the image label, gpu-plugin
--version, the NVIDIA command), and the image's packages pinned (requirements-image.txt) and used
by the Dockerfile so that two builds of one commit get the same packages."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.unit.test_deploy_lint import DOCKERFILE, dockerfile_instructions

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements-image.txt"
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = importlib.metadata.version("gpu-device-plugin")  # what packaging read from common/version.py

sys.path.insert(0, str(REPO / "scripts"))
from lock_image_deps import canonical, runtime_closure  # noqa: E402


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"not an exact pin: {line!r}"
            out[canonical(name)] = version
    return out


def lock_problems(text: str) -> list[str]:
    pinned = pins(text)
    problems = [f"{name} (a runtime dependency) is not pinned" for name in runtime_closure() if name not in pinned]
    for raw in PYPROJECT["project"]["dependencies"]:
        req = Requirement(raw)
        version = pinned.get(canonical(req.name))
        if version is not None and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} violates pyproject.toml's {raw!r}")
    if "setuptools" not in pinned:
        problems.append("the build backend (setuptools) is not pinned")
    return problems


def test_every_runtime_dependency_is_pinned_exactly_within_pyproject() -> None:
    assert lock_problems(LOCK.read_text()) == []


def test_the_lock_check_catches_a_missing_or_a_bad_pin() -> None:
    text = LOCK.read_text()
    assert any("pyzmq" in p for p in lock_problems(re.sub(r"(?m)^pyzmq==.*\n", "", text)))
    assert any("protobuf==6.0" in p for p in lock_problems(re.sub(r"(?m)^protobuf==.*$", "protobuf==6.0", text)))


def dockerfile_lock_problems(text: str) -> list[str]:
    """The build stage installs the lock first, then the product without resolving anything."""
    runs = [args for kw, args in dockerfile_instructions(text) if kw == "RUN"]
    copies = [args for kw, args in dockerfile_instructions(text) if kw == "COPY"]
    problems = []
    if not any("requirements-image.txt" in c.split()[0] for c in copies):
        problems.append("requirements-image.txt is not copied into the build")
    if not any(re.search(r"pip install .*-r requirements-image\.txt", r) for r in runs):
        problems.append("the build does not install requirements-image.txt")
    product = [r for r in runs if re.search(r"pip install [^&]* \.(\s|$)", r)]
    if not product or any("--no-deps" not in r for r in product):
        problems.append("the product is installed without --no-deps (its resolver could pick other versions)")
    return problems


def test_the_dockerfile_installs_exactly_the_lock() -> None:
    assert dockerfile_lock_problems(DOCKERFILE.read_text()) == []


def test_the_dockerfile_check_catches_an_unpinned_build() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_lock_problems(text.replace("--no-deps ", "")) != []
    assert dockerfile_lock_problems(text.replace("-r requirements-image.txt", "grpcio")) != []


def test_one_version_in_the_label_the_cli_and_the_nvidia_command() -> None:
    labels = " ".join(args for kw, args in dockerfile_instructions(DOCKERFILE.read_text()) if kw == "LABEL")
    assert f'org.opencontainers.image.version="{VERSION}"' in labels
    assert "org.opencontainers.image.revision=" in labels
    for command in ("gpu-plugin", "nvidia-device-plugin"):
        result = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout) == (0, f"gpu-device-plugin {VERSION}\n")
    chart = (REPO / "deploy" / "chart" / "gpu-device-plugin" / "Chart.yaml").read_text()
    assert f'appVersion: "{VERSION}"' in chart


def test_nvidias_commands_are_installed_on_path() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["nvidia-device-plugin"] == "services.nvidia_entry:main"
    assert scripts["config-manager"] == "services.config_manager:main"
    assert (BIN / "nvidia-device-plugin").is_file() and (BIN / "config-manager").is_file()


def test_the_entry_point_runs_supervisord_through_the_installed_wrapper() -> None:
    assert PYPROJECT["project"]["scripts"]["gpu-plugin-supervisord"] == "services.supervisord:main"
    assert (BIN / "gpu-plugin-supervisord").is_file()
    entrypoint = (REPO / "scripts" / "entrypoint.sh").read_text()
    assert '\ngpu-plugin-supervisord -c "$conf" &\n' in entrypoint


def test_the_services_version_is_the_packaged_one() -> None:
    from common.version import VERSION as CONSTANT

    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "common.version.VERSION"}
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    assert CONSTANT == VERSION
