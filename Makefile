# recap-suite: one-line entry points. Everything runs in a local venv (.venv) that `make install` creates.
#   make reproduce -- set up, then the paper's whole chain in miniature on the tiny world (the main job on CPU;
#                     PROFILE=quick ~9 min on 2 cores, PROFILE=full <= 60 min) -> runs/reproduce/$(PROFILE)/report.md
#   make test      -- set up and run the default test suite (what CI runs)
#   make tiny      -- set up, generate the tiny world + recaptions, train and evaluate Recap-CLIP on it at the
#                     paper's p = 0.8, CLIPA stage 1 + stage 2 (~7 min on 2 cores)
# The chains (tiny*, world-recap, reproduce) run through the suite's one step runner (experiments/runner.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORLD ?= data/world

.PHONY: install test test-slow lint tiny tiny-sweep world world-recap bench clean-venv lock tiny-captioner tiny-recaption tiny-dit reproduce

# pip (not uv/poetry): the torch 2.14.1 / torchvision 0.29.1 wheels come from the machine's local wheel folder.
# requirements/lock.txt is the exact tested set; pyproject.toml holds the ranges.
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c requirements/lock.txt -e ".[dev]"
	$(PY) -m pip install --no-deps -c requirements/lock.txt img2dataset
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# world.json is written last, so its absence means "no world or an interrupted one": (re)generate then. A world of
# an older format (writer.py's FORMAT_VERSION: a split added since, e.g. VG-Attribution) is regenerated too.
WORLD_FORMAT := $(shell sed -n 's/^FORMAT_VERSION = //p' datamodules/tiny_world/writer.py)
ifeq ($(shell grep -s -c '"format_version": $(WORLD_FORMAT),' $(WORLD)/world.json),0)
.PHONY: $(WORLD)/world.json
endif
$(WORLD)/world.json: | $(VENV)/.installed
	$(PY) -m experiments world --out $(WORLD) --overwrite

world: $(WORLD)/world.json

# Every chain below runs through the suite's one step runner (experiments/runner.py): `clip-table` for the CLIP rows,
# `reproduce --chain NAME` for the others (steps as make had them: one whose outputs exist is skipped; logs and
# timings in runs/tiny/chains/NAME/).
CHAIN := $(PY) -m experiments reproduce --world $(WORLD) --chain

# Recaptions for the tiny world (an imperfect oracle until the captioner exists), joined to the shards as sidecars
# through the same path as the real Recap-DataComp-1B table.
world-recap: | $(VENV)/.installed
	$(CHAIN) world-recap

# The main job: paper Table 3's chosen row (p = 0.8) in miniature, both CLIPA stages, then its table.
tiny: world-recap
	$(PY) -m experiments clip-table --table table3 --rows p0.8 --tiny

# The tiny-world p sweep reported in docs/clip.md (~25 min on 2 cores).
tiny-sweep: world-recap
	$(PY) -m experiments clip-table --table table3 --rows p0.0 p0.5 p0.8 p1.0 --tiny

# The tiny-world captioner (docs/captioner.md): a "web CLIP" trained on alt-text (the paper's OpenAI CLIP), its tower
# exported as an HF CLIPVisionModel, the world tokenizer and a text-pretrained tiny Llama (LLaMA-3's part), then
# LLaVA-1.5 stage 1, stage 2 and caption tuning, and the llava-hf export (runs/tiny/captioner/hf).
tiny-captioner: | $(VENV)/.installed
	$(CHAIN) tiny-captioner

# The tiny captioner recaptions the web shards (resumable: a rerun finishes only what is missing), then the captions
# are merged and joined to the shards as sidecars for the caption-mix DataModule (sources: recaption:
# "sidecar:re_caption" with sidecar_dir $(WORLD)/sidecars_llava). Builds the captioner first when it is missing.
tiny-recaption: | $(VENV)/.installed
	$(CHAIN) tiny-recaption

# The Table 7 miniature (docs/dit.md): the DiT's own tiny world (one larger object per image, so shapes survive at
# 16 px), its oracle recaptions and pinned judge, the DiT cache (pixels + web-CLIP text features of both caption
# sources), DiT at p = 0 and p = 1 from the cache, and both evaluated on both prompt sets. The text encoder is the
# web CLIP of the default world (built first when it is missing).
DITP ?= p0.0 p1.0
DITWORLD ?= data/world_dit
tiny-dit: | $(VENV)/.installed
	$(CHAIN) tiny-dit --dit-world $(DITWORLD) --dit-p $(DITP)

# The whole paper in miniature (docs/reproduce/README.md): world -> web CLIP -> captioner -> recaption -> analysis ->
# Recap-CLIP at several p -> Recap-DiT at p = 0 and 1 -> evaluation -> runs/reproduce/$(PROFILE)/report.md. Resumable.
PROFILE ?= quick
reproduce: install
	$(PY) -m experiments reproduce --profile $(PROFILE)

bench: world
	$(PY) -m benchmarks.loader --shards $(WORLD)/web
	$(PY) -m benchmarks.clip_step

clean-venv:
	rm -rf $(VENV)

# Re-resolve the dependency ranges in pyproject.toml into requirements/lock.txt (needs PyPI; takes ~2 min).
lock:
	rm -rf /tmp/recap-lock-venv && $(PYTHON) -m venv /tmp/recap-lock-venv
	/tmp/recap-lock-venv/bin/pip install -e ".[dev]" && /tmp/recap-lock-venv/bin/pip install --no-deps img2dataset
	{ head -3 requirements/lock.txt; /tmp/recap-lock-venv/bin/pip freeze --exclude-editable | grep -vi '^recap-suite'; } > requirements/lock.new
	mv requirements/lock.new requirements/lock.txt
