# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench protos settings-table manifests image image-test clean

# The product and, beside it, the development tools (kubelet simulator, simulated driver,
# dev stack): a distribution of their own that never goes into the image.
$(STAMP): pyproject.toml devtools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]' -e ./devtools
	touch $(STAMP)

# grpc-js, for tests/unit/test_h2grpc_interop.py: a gRPC client apart from grpc core (pinned by its lock file).
INTEROP := tests/interop/node_modules/.package-lock.json
$(INTEROP): tests/interop/package.json tests/interop/package-lock.json
	npm ci --prefix tests/interop --ignore-scripts --no-audit --no-fund --silent

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Most of the suite waits on real processes and sockets, not the CPU: four workers on two
# cores, work-stealing so one slow supervisord test does not hold a worker's whole queue.
test: $(STAMP) $(INTEROP)
	$(BIN)/pytest -n 4 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The C++ client (bench/cpp) measures Allocate, GetPreferredAllocation and a ListAndWatch from the server's side.
bench: $(STAMP)
	-$(MAKE) -s -C bench/cpp  # the C++ client: needs libgrpc++-dev (bench/cpp/Makefile)
	$(BIN)/python bench/run.py

# The image, with podman (no Docker engine needed; apt-get install podman buildah runc mmdebstrap uidmap):
# scripts/image.py says why each step. IMAGE=... names it (default localhost/gpu-device-plugin:dev).
image: $(STAMP)
	$(BIN)/python scripts/image.py

# The built image run as Kubernetes runs it (tests/image: not part of `make test`).
image-test: image
	$(BIN)/pytest -q tests/image

protos: $(STAMP)
	PATH=$(BIN):$$PATH scripts/gen-protos.sh

settings-table: $(STAMP)
	$(BIN)/python scripts/settings_table.py

# deploy/*.yaml from the Helm chart (a test fails when they differ).
manifests: $(STAMP)
	$(BIN)/python scripts/render_manifests.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .image
