# Two commands do all the set-up on a fresh machine (see README):
#   make run   — virtual environment, dependencies, default models, then the app
#   make test  — the same set-up, then the whole test suite
# torch==2.13.0 is installed first and on its own: asking for torch through a range
# in pyproject would let pip pull a multi-gigabyte CUDA build where the CPU one is meant.
# On Linux, MLX's CPU build is added for the parity tests of the MLX backend (tests/mlx):
# its wheels need glibc 2.35 or newer, so where there is none the tests skip instead of
# the install failing. On Apple Silicon, pyproject installs MLX itself.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.quire-installed
TORCH  := torch==2.13.0
MLX    := mlx[cpu]==0.32.4

.PHONY: run test install models bench package clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	if [ "$$(uname -s)" = Linux ]; then \
		$(PY) -m pip install --disable-pip-version-check -q '$(MLX)' \
		|| echo "note: no $(MLX) wheel for this system; tests/mlx will skip"; \
	fi
	touch $(STAMP)

install: $(STAMP)

models: $(STAMP)
	$(PY) -m app.cli models install

run: models
	$(PY) -m app.cli gui

test: models
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest

bench: models
	$(PY) -m app.cli bench runtime --out bench-out/runtime.json

# The app bundle for this OS (Linux: dist/quire/ and a tar.gz; macOS: dist/Quire.app);
# see packaging/README.md. PyInstaller is a build tool only, so it is not a dependency.
package: models
	$(PY) -m pip install --disable-pip-version-check -q "pyinstaller==6.22.3"
	$(PY) packaging/build.py

clean:
	rm -rf $(VENV) build dist *.egg-info
