# Two commands do all set-up on a fresh machine:
#   make tune   - start the local black-box server on the bundled model and tune AG News against it
#   make test   - run the whole test suite (what CI runs)
#   make test-vllm - install vLLM (CPU) into .venv-vllm once, then test this server and the vllm backend against it
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: install tune test test-vllm bench clean

# Quiet on purpose (-qq: pip's errors still print): a first `make tune` should show progress, not pip's chatter.
$(STAMP): pyproject.toml
	@echo "installing bbt-client and its extras into $(VENV) (first run only, ~2 min)"
	@$(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq --upgrade pip
	@# torch==2.13.0 first and in the same resolve: an unpinned torch would pull a multi-GB CUDA build.
	@$(BIN)/python -m pip install -qq "torch==2.13.0" -e ".[server,gdfo,plot,dev]"
	@touch $(STAMP)

install: $(STAMP)

tune: $(STAMP)
	@$(BIN)/python examples/tune_local.py --task agnews --out runs/agnews-42-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The tests build a tiny Llama folder, start vLLM on it (~30-45 s) and this server beside it (tests/vllm/).
test-vllm: $(STAMP)
	@tests/vllm/install.sh
	$(BIN)/python -m pytest -q -m vllm tests/vllm

bench: $(STAMP)
	$(BIN)/python benchmarks/server_throughput.py
	$(BIN)/python benchmarks/tune_sst2.py
	$(BIN)/python benchmarks/tune_sst2.py --task agnews
	$(BIN)/python benchmarks/whitebox_ceiling.py
	$(BIN)/python benchmarks/faults.py

clean:
	rm -rf $(VENV) runs .pytest_cache
