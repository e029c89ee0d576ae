#!/usr/bin/env python3
"""Renders the static manifests in deploy/ from the Helm chart, the one source of truth.

    scripts/render_manifests.py          rewrite deploy/*.yaml from deploy/chart/gpu-device-plugin
    scripts/render_manifests.py --check  exit 1, naming the files, when they differ from the chart

Rendering is Helm's own engine (helm-python-sdk, offline), the same as `helm template`.
tests/unit/test_chart.py fails when a static manifest drifts from its render.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "chart" / "gpu-device-plugin"
RELEASE = "gpu-device-plugin"
NAMESPACE = "kube-system"

# file in deploy/ -> the chart values it is rendered with
STATIC: dict[str, dict[str, Any]] = {
    "daemonset.yaml": {},
    # A node whose driver runs in a container (GPU Operator driver root) with CDI for the runtime.
    "daemonset-cdi-operator.yaml": {"deviceListStrategy": "cdi-cri", "nvidiaDriverRoot": "/run/nvidia/driver"},
}


def render(values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> str:
    """The chart's documents as one YAML stream, in template order, empty templates left out."""
    from helm_python import Chart

    with Chart.load(CHART) as chart:
        rendered = chart.render(values, name=name, namespace=namespace)
    docs = [text.strip("\n") for _path, text in sorted(rendered.items()) if text.strip()]
    return "\n---\n".join(docs) + "\n"


def static_text(file_name: str) -> str:
    header = (f"# Generated from deploy/chart/gpu-device-plugin by scripts/render_manifests.py "
              f"(values: {STATIC[file_name] or 'the defaults'}); do not edit, re-render.\n")
    return header + render(STATIC[file_name])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--deploy-dir", type=Path, default=REPO / "deploy", help="where the manifests are")
    args = p.parse_args(argv)
    stale = []
    for file_name in STATIC:
        path = args.deploy_dir / file_name
        text = static_text(file_name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(file_name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale (re-render with scripts/render_manifests.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
