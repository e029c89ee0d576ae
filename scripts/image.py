#!/usr/bin/env python3
"""`make image`: builds the Dockerfile into a local image with podman, on a machine without a Docker
engine or a registry (this project's machines and CI), and the same where a registry is reachable.

Why each step (all found by trying, on Debian bookworm with its podman 4.3 / buildah 1.28):
- podman runs with a containers.conf of our own (CONTAINERS_CONF): runtime runc (crun 1.8 refuses
  this kernel's hybrid cgroups) and default ulimits no higher than the machine's hard limits (the
  defaults exceed them and every container fails to start).
- The base, python:3.11-slim, is pulled where a registry answers. Where none does, a stand-in of
  the same name is built from the machine's own Debian sources: mmdebstrap's minbase with python3,
  its venv module and the CA bundle, `python` linked into /usr/local/bin as the real image has it,
  documentation left out (an image has no reader for it).
- pip inside the build needs the machine's pip settings (index, extra indexes, CA bundle: this
  machine reaches PyPI through an egress proxy with its own CA). They are mounted into the build
  stage only; buildah 1.28 leaves an empty file or directory behind for each mount target in
  every stage's layer, so the stage is built with the mounts first and then the whole file without
  any (the build stage comes from the cache, the final stage never sees a mount).

Prints the image's size and the build's time at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".image"  # gitignored: containers.conf, the generated pip.conf
DEFAULT_IMAGE = "localhost/gpu-device-plugin:dev"
BASE = "python:3.11-slim"
DEBIAN_SUITE = "bookworm"  # the real python:3.11-slim's Debian
# dpkg leaves these out of the stand-in base (the real slim image carries none of them either).
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*")


class ImageError(Exception):
    pass


def containers_conf() -> Path:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = hard if hard != resource.RLIM_INFINITY else 1 << 20
    WORK.mkdir(exist_ok=True)
    path = WORK / "containers.conf"
    path.write_text(f'[engine]\nruntime = "runc"\n\n[containers]\n'
                    f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n')
    return path


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def run(argv: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, env=env, text=True, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def ensure_base(env: dict[str, str]) -> str:
    """The base image's name: the real one where it can be pulled, else a local stand-in."""
    if run(["podman", "image", "exists", BASE], env).returncode == 0:
        return BASE
    pulled = run(["podman", "pull", "-q", f"docker.io/library/{BASE}"], env, capture_output=True, timeout=300)
    if pulled.returncode == 0:
        return BASE
    print(f"no registry ({pulled.stderr.strip()[:200]}): building a stand-in {BASE} from Debian {DEBIAN_SUITE}",
          flush=True)
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed (apt-get install mmdebstrap) and the base cannot be pulled")
    # merged-usr by mmdebstrap's own hook: the usrmerge package would bring all of perl (~50 MB).
    debstrap = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES],
                "--customize-hook=ln -sf /usr/bin/python3 \"$1/usr/local/bin/python\"",
                "--customize-hook=rm -rf \"$1/var/lib/apt/lists\"/* \"$1/var/cache/apt\"/*",
                DEBIAN_SUITE, "-"]
    print("+", " ".join(debstrap), "| podman import - localhost/" + BASE, flush=True)
    with subprocess.Popen(debstrap, stdout=subprocess.PIPE, env=env) as strap:
        imported = subprocess.run(["podman", "import", "--quiet", "-", f"localhost/{BASE}"], stdin=strap.stdout,
                                  env=env, check=False)
    if strap.returncode != 0 or imported.returncode != 0:
        raise ImageError(f"building the stand-in base failed (mmdebstrap {strap.returncode}, import "
                         f"{imported.returncode})")
    return BASE


def pip_mounts() -> list[str]:
    """`-v` options giving the build stage this machine's pip settings and the files they name."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    WORK.mkdir(exist_ok=True)
    conf = WORK / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    mounts = [f"{conf}:/etc/pip.conf:ro"]
    for value in settings.values():
        for word in value.split():
            path = word.removeprefix("file://")
            if word.startswith("file://") and path.rstrip("/").endswith("/simple"):
                path = os.path.dirname(path.rstrip("/"))  # a local index's pages link files beside them
            if path.startswith("/") and os.path.exists(path):
                mounts.append(f"{path}:{path}:ro")
    return [a for m in dict.fromkeys(mounts) for a in ("-v", m)]


def revision() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def build(image: str) -> None:
    started = time.monotonic()
    env = podman_env()
    ensure_base(env)
    common = ["podman", "build", "--pull=never", "--network", "host", "--layers",
              "--build-arg", f"REVISION={revision()}", "-f", str(REPO / "Dockerfile")]
    staged = run([*common, *pip_mounts(), "--target", "build", "-t", f"{image}-build", str(REPO)], env)
    if staged.returncode != 0:
        raise ImageError(f"the build stage failed (exit {staged.returncode})")
    final = run([*common, "-t", image, str(REPO)], env)
    if final.returncode != 0:
        raise ImageError(f"the image build failed (exit {final.returncode})")
    run(["podman", "rmi", "--force", f"{image}-build"], env, capture_output=True)
    size = run(["podman", "image", "inspect", "--format", "{{.Size}}", image], env, capture_output=True)
    megabytes = int(size.stdout.strip() or 0) / 1e6
    print(f"image {image}: {megabytes:.0f} MB uncompressed, built in {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--image", default=os.environ.get("IMAGE", DEFAULT_IMAGE))
    args = p.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9./_:-]+", args.image):
        print(f"image.py: --image {args.image!r} is not an image name", file=sys.stderr)
        return 2
    if shutil.which("podman") is None:
        print("image.py: podman is not installed (apt-get install podman buildah runc mmdebstrap)", file=sys.stderr)
        return 2
    try:
        build(args.image)
    except (ImageError, subprocess.TimeoutExpired) as e:
        print(f"image.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
