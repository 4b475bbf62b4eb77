# make demo: set up and run the built-in CPU demo (train + sample + quality figure on real digits).
# make test: set up and run the test suite.
# The virtual environment lives outside the clone, keyed by the requirements' hash, and is reused.
VENV ?= $(HOME)/.cache/dit-venv/$(shell sha256sum requirements.txt | cut -c1-16)
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.complete

# No prerequisite: the folder name already changes with requirements.txt, and a fresh clone's
# newer file times must not trigger a rebuild.
$(VENV)/.complete:
	rm -rf $(VENV) && python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	PATH=$(VENV)/bin:$$PATH bash demo.sh
