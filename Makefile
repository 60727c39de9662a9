# manyview: `make demo` (install + Fashion-MNIST image-text demo + web UI) and `make test` (install + suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
DEMO_STEPS ?= 300
DEMO_BATCH ?= 128
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: install install-dev system-deps browser-deps demo demo-train serve test benchmark gpu-check clean

install: $(VENV)/.installed

# torch 2.14.1 / torchvision 0.29.1 come from the local wheel cache where pip finds them. The `train` extra is
# training and export; serving alone needs only the base install (`pip install .`, no torch; see README).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[train]'
	touch $@

install-dev: $(VENV)/.installed-dev

# img2dataset (the tests run it) pins webdataset<0.3 but only uses its TarWriter, which webdataset 1.x keeps: it is
# installed without its dependencies, which `dev` lists instead.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[train,dev]'
	$(PY) -m pip install --quiet --no-deps img2dataset==1.47.0
	touch $@

system-deps:
	@[ -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

browser-deps:
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

$(DEMO_DIR)/shards/manifest.json: | system-deps
	$(PY) -m trainer.prepare --source $(FASHION_MNIST) --output $(DEMO_DIR)/shards --shard-size 10000

# The demo's recipe is trainer/recipes/clip.yaml with a small CNN and text tower so it trains in minutes on 2 cores.
demo-train: install $(DEMO_DIR)/shards/manifest.json
	$(PY) trainer/pretrain.py --objective clip --train-data '$(DEMO_DIR)/shards/train-{000000..000005}.tar.gz' \
	  --output $(DEMO_DIR) --backbone cnn-small --batch-size $(DEMO_BATCH) --max-steps $(DEMO_STEPS) --lr 2e-3 \
	  --checkpoint-every 100 --set 'text={width: 128, heads: 4, layers: 2, context_length: 16}' $(if $(wildcard $(DEMO_DIR)/checkpoints),--resume,)
	$(PY) -m trainer.evaluate --model $(DEMO_DIR)/model --train-data '$(DEMO_DIR)/shards/train-000000.tar.gz' \
	  --test-data '$(DEMO_DIR)/shards/test-000000.tar.gz' --zero-shot | tee $(DEMO_DIR)/eval.json
	$(PY) -m export --model $(DEMO_DIR)/model --output $(DEMO_DIR)/onnx
	$(PY) -m index.build --encoder $(DEMO_DIR)/onnx --data '$(DEMO_DIR)/shards/test-*.tar.gz' --output $(DEMO_DIR)/index

serve: install
	$(PY) -m app --encoder $(DEMO_DIR)/onnx --index $(DEMO_DIR)/index --host $(HOST) --port $(PORT)

demo: demo-train serve

# Two workers, one test module each at a time (module fixtures such as the Ray cluster start once), one OpenMP
# thread each (two would spin against each other: 1.7x the CPU time); the learning checks pin their own threads.
# On the 2-core EPYC: 665 s of pytest, against about 850 s in one process.
test: install-dev browser-deps
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --timeout 900 --durations=15

benchmark: install-dev
	$(PY) -m pytest -q tests -m benchmark -s -p no:cacheprovider

# Every GPU-only test and benchmark with its correctness checks, in under 9 minutes on one H100; appends to
# $(GPU_CHECK_OUTPUT). Without a CUDA GPU it says so and exits 0.
GPU_CHECK_OUTPUT ?= tests/benchmarks/RESULTS_gpu.md
gpu-check: install-dev
	$(PY) tests/benchmarks/gpu_check.py --output $(GPU_CHECK_OUTPUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
