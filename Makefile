# make serve   install, import the demo models if the store lacks them, serve on :3000
# make test    install with test tools, lint (ruff), run every test (imports demo models into a throw-away store)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 3000
export BENTOML_DO_NOT_TRACK := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install browser models serve test bench build image image-run samples clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# Label Studio's brush-RLE decoder for the tests; its package pins numpy and OpenCV below ours, and the
	# decoder needs neither its other dependencies, so it goes in without them.
	$(BIN)/pip install --quiet --no-deps label-studio-sdk==2.1.2
	$(BIN)/python -c "import bentoml, torch, tensorflow, transformers, scipy"
	touch $@

install: $(BIN)/.installed

models: install
	$(BIN)/python import_models.py --demo --skip-existing

serve: models
	$(BIN)/bentoml serve service:Segmentation --port $(PORT)

# Debian's chromium for the dashboard test (needs root; elsewhere that test is skipped, and fails under CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the dashboard browser test will be skipped (apt-get install chromium)"

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The benchmarks (about 35 minutes; not part of the tests): compiled runtimes against the native forward
# (build/benchmark/runtimes.{json,md}), then serving (build/benchmark/results.{json,md,png})
bench: models
	$(BIN)/python benchmarks/runtimes.py
	$(BIN)/python benchmarks/benchmark.py

build: models
	$(BIN)/bentoml build

# The Bento as a CPU-only OCI image (podman with a local base image where no Docker engine runs),
# exported as an OCI archive for a server; then run it with CPU and memory limits.
image: models
	$(BIN)/python scripts/build_image.py --export build/segmentation.oci.tar

image-run:
	scripts/run_image.sh

samples: install
	$(BIN)/python -m segmentation.samples data

clean:
	rm -rf $(VENV) .pytest_cache
