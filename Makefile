# make demo: set up and run the built-in CPU demo (train + sample + quality figure on real digits).
# make test: set up and run the test suite, then the numerical tests again under other CPU kernels.
# The virtual environment lives outside the clone, keyed by the requirements' hash, and is reused.
VENV ?= $(HOME)/.cache/dit-venv/$(shell sha256sum requirements.txt | cut -c1-16)
PY := $(VENV)/bin/python

# Float32 results differ between CPUs by rounding: oneDNN picks its kernels by the instruction set.
# DNNL_MAX_CPU_ISA caps that set, so every machine can rerun the tests that compare against the
# reference data (tests/golden) with the kernels of an older and of a newer CPU: a tolerance that
# holds on one machine only fails here. (A cap above what the CPU has changes nothing.)
NUMERICAL_TESTS := tests/test_models.py tests/test_diffusion.py tests/test_sample.py tests/test_sampling.py
ISAS := SSE41 AVX512_CORE
ISA_TESTS := $(ISAS:%=test-isa-%)

.PHONY: demo test test-isa $(ISA_TESTS) venv
venv: $(VENV)/.complete

# No prerequisite: the folder name already changes with requirements.txt, and a fresh clone's
# newer file times must not trigger a rebuild.
# The first run installs for a few minutes: say so, and let pip show what it fetches.
$(VENV)/.complete:
	@echo "setting up the environment (once) in $(VENV)"
	rm -rf $(VENV) && python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# The full suite first, then the ISA reruns (a recipe line, so the order holds under make -j too).
test: venv
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory test-isa

# The numerical tests under each capped instruction set, e.g. `make test-isa-SSE41` for one.
test-isa: $(ISA_TESTS)

$(ISA_TESTS): test-isa-%: venv
	DNNL_MAX_CPU_ISA=$* $(PY) -m pytest -q -m "not slow" $(NUMERICAL_TESTS)

demo: venv
	PATH=$(VENV)/bin:$$PATH bash demo.sh
