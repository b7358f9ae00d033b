# radgate: `make demo` runs the whole product on the sample data, `make test` runs the suite.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
RADGATE  := $(VENV)/bin/radgate
# Sample data: referenced by path, never copied into the repository (`make data` fetches it elsewhere).
DATA     ?= ../shared/data/chest-abd-xr
EXTERNAL ?= ../shared/data/external-xr
MODEL    ?= models/chest-abd
PYTEST_ARGS ?=

export RADGATE_DATA := $(abspath $(DATA))
export RADGATE_EXTERNAL := $(abspath $(EXTERNAL))

.PHONY: venv system-deps model demo test lint bench data clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# DICOM peers and validators used by the demo and the tests, the headless browser the
# dashboard tests drive, and openssl for the tests' TLS certificates (Debian packages).
system-deps:
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null || ! command -v Orthanc >/dev/null \
	    || ! test -x /usr/bin/chromium || ! test -x /usr/bin/chromedriver || ! command -v openssl >/dev/null; then \
	  echo "installing dcmtk, orthanc, dicom3tools, chromium, chromium-driver, openssl"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    dcmtk orthanc dicom3tools chromium chromium-driver openssl >/dev/null; \
	fi

$(MODEL)/model.json: | venv
	$(RADGATE) train --data $(DATA) --out $(MODEL) --external $(EXTERNAL)

model: $(MODEL)/model.json

demo: venv system-deps model
	$(RADGATE) evaluate --model $(MODEL)
	$(RADGATE) demo --config config.yaml --data $(DATA)

test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check gateway inference training db tests bench
	$(VENV)/bin/ruff format --check gateway inference training db tests bench
	$(VENV)/bin/mypy gateway inference training db

# Each benchmark prints ratios against a reference measured in the same run (docs/PERFORMANCE.md).
bench: venv system-deps model
	$(PY) bench/inference.py --data $(DATA) --model $(MODEL)
	$(PY) bench/ingest.py --count 200 --rounds 3
	$(PY) bench/forward.py --model $(MODEL) --count 200
	$(PY) bench/train.py --data $(DATA)

# For users outside this setup: the published sample radiographs (Lakhani et al. 2018, via the RSNA 2020 notebook).
data:
	mkdir -p var/download
	curl -L -o var/download/data.zip 'https://github.com/wfwiggins/RSNA-Image-AI-2020/blob/master/data.zip?raw=true'
	unzip -o var/download/data.zip -d var/download/chest-abd-xr
	@echo "now run: make demo DATA=var/download/chest-abd-xr/data"

clean:
	rm -rf var .pytest_cache
