# The README's two commands, `make demo` and `make test`, plus `make lint` / `make format`, over a local
# virtual environment in .venv. Each target sets up only what is missing, then verifies that the compiled
# kernels are the ones that run:
#
#   .venv/                     $(PYTHON) -m venv .venv                              (once)
#   .venv/.requirements-<key>  pip install -r requirements.txt                      (again when its content changes)
#   inplace_abn/_C.abi3.so     pip install --no-build-isolation --no-deps -e .      (again when src/ or setup.py
#                              (INPLACE_ABN_REQUIRE_EXTENSION=1: a failed build stops make)   changes)
#   check-backend              INPLACE_ABN_BACKEND=cpp: an error unless inplace_abn._C loads
#
# then the README's command itself inside .venv (its bin/ first on PATH).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# .venv/bin first on PATH, so that the commands below are the README's, word for word.
RUN := PATH="$(abspath $(BIN)):$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

DEMO_CMD := python -m segmentation.demo
TEST_CMD := python -m pytest tests -q
PURE_TEST_CMD := INPLACE_ABN_BACKEND=python python -m pytest tests -q

# Stamps keyed on the content of the requirement files (not their dates, which a checkout changes).
REQ_STAMP := $(VENV)/.requirements-$(firstword $(shell cksum < requirements.txt))
LINT_STAMP := $(VENV)/.lint-$(firstword $(shell cksum < requirements-lint.txt))
EXT := inplace_abn/_C.abi3.so
EXT_SOURCES := setup.py $(wildcard src/*.h src/*.cpp src/cpu/*.cpp src/cpu/*.h src/cuda/*.cu src/cuda/*.cuh src/cuda/*.h)
CXX_FILES := $(wildcard src/*.h src/*.cpp src/cpu/*.cpp src/cpu/*.h src/cuda/*.cu src/cuda/*.cuh src/cuda/*.h)

.PHONY: help demo test test-python check-backend lint format clean distclean

help:
	@echo "make demo         set up .venv if needed, build the extension, run: $(DEMO_CMD)"
	@echo "make test         set up .venv if needed, build the extension, run: $(TEST_CMD)"
	@echo "make test-python  the suite on the pure-PyTorch path: $(PURE_TEST_CMD)"
	@echo "make lint         ruff check, ruff format --check, clang-format --dry-run (src/)"
	@echo "make format       ruff check --fix, ruff format, clang-format -i (src/)"
	@echo "make clean        remove the build products (build/, $(EXT)); make distclean also removes $(VENV)"

demo: check-backend
	$(RUN) INPLACE_ABN_BACKEND=cpp $(DEMO_CMD) $(ARGS)

test: check-backend
	$(RUN) INPLACE_ABN_BACKEND=cpp $(TEST_CMD) $(ARGS)

test-python: check-backend
	$(RUN) $(PURE_TEST_CMD) $(ARGS)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "make: Python >= 3.10 is needed (PyTorch 2.13 needs it), got " + sys.version.split()[0] + "; run make PYTHON=python3.X")'
	$(PYTHON) -m venv $(VENV)

$(REQ_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.requirements-*
	touch $@

# A new environment or a changed source rebuilds; the build log stays in .venv/build.log.
$(EXT): $(REQ_STAMP) $(EXT_SOURCES)
	@echo "building inplace_abn._C (log: $(VENV)/build.log) ..."
	@INPLACE_ABN_REQUIRE_EXTENSION=1 $(BIN)/python -m pip install --disable-pip-version-check --no-build-isolation \
		--no-deps -v -e . > $(VENV)/build.log 2>&1 || { tail -60 $(VENV)/build.log; \
		echo "make: building the C++ extension failed; the full log is $(VENV)/build.log"; exit 1; }
	@sed -n '/inplace_abn build configuration/,/cxx flags/p' $(VENV)/build.log | tail -10  # pip runs setup.py twice
	@touch $@

check-backend: $(EXT)
	@INPLACE_ABN_BACKEND=cpp $(BIN)/python -c "import inplace_abn; print('inplace_abn', inplace_abn.__version__, 'from', inplace_abn.__path__[0] + ', backend:', inplace_abn.get_backend())" \
		|| { echo "make: the compiled extension inplace_abn._C does not load (error above), so the compiled kernels would not run; rebuild it: rm -f $(EXT) && make $(EXT)"; exit 1; }

$(LINT_STAMP): requirements-lint.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements-lint.txt
	rm -f $(VENV)/.lint-*
	touch $@

lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run --Werror $(CXX_FILES)

format: $(LINT_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/clang-format -i $(CXX_FILES)

clean:
	rm -rf build inplace_abn/_C*.so

distclean: clean
	rm -rf $(VENV)
