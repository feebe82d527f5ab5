# Real Open Inference Protocol servers for the V2 backend's tests (tests/integration/
# test_v2_backend.py): Seldon MLServer and NVIDIA Triton (as nvidia-pytriton bundles it), each in
# a virtual environment of its own, because their pins clash with the gateway's (fastapi, starlette,
# uvloop, protobuf, numpy). Every package is pinned in tests/v2_servers/*-requirements.txt; a stamp
# named after the file's digest makes this a no-op until the file changes. `make test` needs it.
V2_SERVERS_PYTHON ?= python3
MLSERVER_VENV ?= .venv-mlserver
TRITON_VENV   ?= .venv-triton
MLSERVER_REQS := tests/v2_servers/mlserver-requirements.txt
TRITON_REQS   := tests/v2_servers/triton-requirements.txt
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed-$(shell sha1sum $(MLSERVER_REQS) | cut -c1-12)
TRITON_STAMP   := $(TRITON_VENV)/.installed-$(shell sha1sum $(TRITON_REQS) | cut -c1-12)

.PHONY: v2-servers

v2-servers: $(MLSERVER_STAMP) $(TRITON_STAMP) ## MLServer and Triton in .venv-mlserver, .venv-triton

$(MLSERVER_STAMP): $(MLSERVER_REQS)
	test -x $(MLSERVER_VENV)/bin/python || $(V2_SERVERS_PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(MLSERVER_REQS)
	rm -f $(MLSERVER_VENV)/.installed-*
	touch $@

$(TRITON_STAMP): $(TRITON_REQS)
	test -x $(TRITON_VENV)/bin/python || $(V2_SERVERS_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $(TRITON_REQS)
	rm -f $(TRITON_VENV)/.installed-*
	touch $@
