# One entry point for users and CI. Everything runs in .venv, built from pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= embedqa-1b-v2
PORT ?= 8080
OUT ?= build/checkpoints/$(MODEL)
MODELS := embedqa-1b-v2 nv-embed-v2 colembed-3b

.PHONY: help setup test demo serve checkpoint bench bench-peers bench-gpu gpu-wheels push watch lint format lock clean

help:
	@echo "make demo                         tiny checkpoints, real servers, example requests"
	@echo "make test                         the whole test suite"
	@echo "make serve MODEL=<dir> [CHECKPOINT=<dir>] [PORT=8080] [SETTING=value ...]"
	@echo "make checkpoint MODEL=<dir> OUT=<dir>   tiny random-weight checkpoint"
	@echo "make bench                        benchmarks (ratios measured side by side)"
	@echo "make bench-peers                  ours vs infinity-emb (own venv in build/peers), same model, CPU"
	@echo "make gpu-wheels                   (with network) wheels/gpu for bench-gpu on an offline GPU box"
	@echo "make bench-gpu [GOLDEN=<dir>]     on a GPU box, no network, no venv: models at official shapes,"
	@echo "                                  attention paths, MaxSim, NV-Embed at 32k, bf16 conformance"
	@echo "make push MODEL=<dir> / make watch MODEL=<dir>   truss push --publish / truss watch"

$(VENV)/.installed: requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing else can pull a (CUDA) build of its own choice.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -r requirements-dev.lock -c constraints.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: setup
	$(PY) tools/demo.py

serve: setup
	$(PY) tools/serve.py $(MODEL) --port $(PORT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

checkpoint: setup
	$(PY) tools/make_checkpoint.py $(MODEL) $(OUT)

bench: setup
	$(PY) bench/bench_maxsim.py
	$(PY) bench/bench_serving.py
	$(PY) bench/bench_engine.py

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
GOLDEN ?= ../shared/golden
GPU_PYTHONS ?= 3.11,3.12,3.13

gpu-wheels: setup
	$(PY) tools/gpu_wheels.py --pythons $(GPU_PYTHONS)

# Both parts always run; the target fails if either did.
bench-gpu:
	@status=0; \
	$(GPU_PYTHON) tools/gpu_env.py bench/bench_gpu.py --json build/bench_gpu.json || status=1; \
	if [ -d "$(GOLDEN)" ]; then \
		$(GPU_PYTHON) tools/gpu_env.py bench/gpu_conformance.py --golden $(GOLDEN) \
			--json build/gpu_conformance.json || status=1; \
	else echo "bench-gpu: no golden fixtures at $(GOLDEN), conformance skipped (GOLDEN=<dir>)"; fi; \
	exit $$status

push: setup
	$(VENV)/bin/truss push $(MODEL) --publish

watch: setup
	$(VENV)/bin/truss watch $(MODEL)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lock: setup
	$(VENV)/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements-dev.lock

clean:
	rm -rf build .pytest_cache .ruff_cache
