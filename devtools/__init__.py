"""Development and test tools: the kubelet simulator, the simulated NVML driver with fault
injection, and the dev stack. Never part of the product: `pip install .` and the image hold
only what a node runs, and an import-linter contract keeps product code from importing this
package. A checkout installs it beside the product (`pip install -e ./devtools`), which
registers the "simulated" NVML backend and the `gpu-plugin-dev` command."""
