# One entry point for users and CI. Everything runs in .venv, built from pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= embedqa-1b-v2
PORT ?= 8080
OUT ?= build/checkpoints/$(MODEL)
MODELS := embedqa-1b-v2 nv-embed-v2 colembed-3b
# Where `make setup` takes torch from: empty = the default index (on an ordinary Linux machine
# PyPI's CUDA build, ~3 GB with its CUDA libraries); e.g. https://download.pytorch.org/whl/cpu
# for the CPU-only wheel.
TORCH_INDEX ?=
# Extra `truss push` flags for `make push`, e.g. --promote, --environment staging.
PUSH_FLAGS ?=

.PHONY: help setup test demo serve checkpoint bench bench-peers bench-gpu gpu-wheels push watch watch-attach lint format lock clean

help:
	@echo "make demo                         tiny checkpoints, real servers, example requests"
	@echo "make page-search-demo             examples/page-search: index sample PDFs, resume, search"
	@echo "make test                         the whole test suite"
	@echo "make serve MODEL=<dir> [CHECKPOINT=<dir>] [PORT=8080] [SETTING=value ...]"
	@echo "make checkpoint MODEL=<dir> OUT=<dir>   tiny random-weight checkpoint"
	@echo "make bench                        benchmarks (ratios measured side by side)"
	@echo "make bench-peers                  ours vs infinity-emb (own venv in build/peers), same model, CPU"
	@echo "make gpu-wheels                   (with network) wheels/gpu for bench-gpu on an offline GPU box"
	@echo "make bench-gpu [GOLDEN=<dir>]     on a GPU box, no network, no venv: models at official shapes,"
	@echo "                                  attention paths, MaxSim, NV-Embed at 32k, bf16 conformance"
	@echo "make setup [TORCH_INDEX=<url>]    .venv; TORCH_INDEX=https://download.pytorch.org/whl/cpu: CPU torch"
	@echo "make push MODEL=<dir> [PUSH_FLAGS=--promote]   published deployment (truss push)"
	@echo "make watch MODEL=<dir>            development deployment, then live patches (truss push --watch)"
	@echo "make watch-attach MODEL=<dir>     watch an existing development deployment (truss watch)"

$(VENV)/.installed: requirements-dev.lock requirements-dev-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing else can pull a (CUDA) build of its own choice.
	$(VENV)/bin/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install --quiet -r requirements-dev.lock -c constraints.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-dev-nodeps.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: setup
	$(PY) tools/demo.py

.PHONY: page-search-demo
page-search-demo: setup
	$(PY) examples/page-search/demo.py

serve: setup
	$(PY) tools/serve.py $(MODEL) --port $(PORT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

checkpoint: setup
	$(PY) tools/make_checkpoint.py $(MODEL) $(OUT)

bench: setup
	$(PY) bench/bench_maxsim.py
	$(PY) bench/bench_serving.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_storage.py

# Optional, not part of `make bench`: the peer gets its own venv (bench/peers/infinity.txt),
# never our lock. PEER_ARGS=... passes options, e.g. PEER_ARGS="--runs 1 --set TORCH_THREADS=1".
PEER_VENV ?= build/peers/infinity

$(PEER_VENV)/.installed: bench/peers/infinity.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEER_VENV)/bin/pip install --quiet -r bench/peers/infinity.txt
	touch $@

bench-peers: setup $(PEER_VENV)/.installed
	$(PY) bench/bench_peers.py --peer-python $(PEER_VENV)/bin/python $(PEER_ARGS)

# On a GPU machine: its own python3 and torch, no network, no venv. What it lacks comes from
# wheels/gpu (made by `make gpu-wheels` on a machine with network, copied with the checkout).
GPU_PYTHON ?= python3
GOLDEN ?= tests/golden
GPU_PYTHONS ?= 3.11,3.12,3.13

gpu-wheels: setup
	$(PY) tools/gpu_wheels.py --pythons $(GPU_PYTHONS)

# Both parts always run; the target fails if either did.
bench-gpu:
	@status=0; \
	$(GPU_PYTHON) tools/gpu_env.py bench/bench_gpu.py --json build/bench_gpu.json || status=1; \
	$(GPU_PYTHON) tools/gpu_env.py bench/gpu_conformance.py --golden $(GOLDEN) \
		--json build/gpu_conformance.json || status=1; \
	exit $$status

# truss 0.18.35: a push is a published deployment by default (`--publish` is deprecated);
# `--watch` makes a development deployment and then patches it as files change. `truss watch`
# alone needs that development deployment to exist.
push: setup
	$(VENV)/bin/truss push $(MODEL) $(PUSH_FLAGS)

watch: setup
	$(VENV)/bin/truss push $(MODEL) --watch

watch-attach: setup
	$(VENV)/bin/truss watch $(MODEL)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lock: setup
	$(VENV)/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' | grep -v '^fastembed==' \
		> requirements-dev.lock

clean:
	rm -rf build .pytest_cache .ruff_cache
