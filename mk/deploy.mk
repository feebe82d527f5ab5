# Deployment targets: container images, docker compose, Kubernetes (kustomize).
# Included from the Makefile. Variables can be overridden: make k8s-render OVERLAY=gpu
DEPLOY_VERSION ?= 0.1.0
IMAGE_PREFIX ?= duoserve
OVERLAY ?= cpu
COMPOSE ?= docker compose
COMPOSE_GPU = $(COMPOSE) -f docker-compose.yml -f docker-compose.gpu.yml
KUBECTL ?= kubectl
DEPLOY_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# The backends take the model files from the model-builder image as a named build context.
MODEL_STORE_CONTEXT = --build-context model-store=docker-image://$(IMAGE_PREFIX)/model-store:$(DEPLOY_VERSION)

# One GPU per backend: TorchServe on GPU 0, TF Serving on GPU 1, or also on GPU 0 when the host
# has a single GPU (TF Serving then keeps to TFSERVING_GPU_MEMORY_FRACTION of it).
TORCHSERVE_GPU ?= 0
TFSERVING_GPU ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$${n:-0}" -ge 2 ] && echo 1 || echo 0)
SMOKE_DIR ?= .smoke

.PHONY: images images-gpu compose-preflight up up-gpu down smoke smoke-gpu \
	k8s-render k8s-apply k8s-check k8s-generate

images: ## Build the model store, the gateway and the CPU backend images
	docker build -f models/Dockerfile --target store -t $(IMAGE_PREFIX)/model-store:$(DEPLOY_VERSION) .
	docker build -f services/gateway/Dockerfile --build-arg VERSION=$(DEPLOY_VERSION) \
		-t $(IMAGE_PREFIX)/gateway:$(DEPLOY_VERSION) .
	docker build -f services/torchserve/Dockerfile $(MODEL_STORE_CONTEXT) \
		--build-arg VERSION=$(DEPLOY_VERSION) --build-arg VARIANT=cpu \
		-t $(IMAGE_PREFIX)/torchserve:$(DEPLOY_VERSION)-cpu .
	docker build -f services/tfserving/Dockerfile $(MODEL_STORE_CONTEXT) \
		--build-arg VERSION=$(DEPLOY_VERSION) --build-arg TF_SERVING_TAG=2.21.0 \
		-t $(IMAGE_PREFIX)/tfserving:$(DEPLOY_VERSION)-cpu .

images-gpu: images ## Also build the -gpu backend images
	docker build -f services/torchserve/Dockerfile $(MODEL_STORE_CONTEXT) \
		--build-arg VERSION=$(DEPLOY_VERSION) --build-arg VARIANT=gpu \
		-t $(IMAGE_PREFIX)/torchserve:$(DEPLOY_VERSION)-gpu .
	docker build -f services/tfserving/Dockerfile $(MODEL_STORE_CONTEXT) \
		--build-arg VERSION=$(DEPLOY_VERSION) --build-arg TF_SERVING_TAG=2.21.0-gpu \
		-t $(IMAGE_PREFIX)/tfserving:$(DEPLOY_VERSION)-gpu .

compose-preflight: ## What compose would only find out when a container fails (the keys file's mode)
	@$(DEPLOY_PYTHON) deploy/compose/preflight.py

up: compose-preflight ## Build and start the CPU stack (needs GRAFANA_ADMIN_PASSWORD and DUOSERVE_API_KEYS_PATH)
	$(COMPOSE) up -d --build
	@echo "gateway http://127.0.0.1:8000  prometheus http://127.0.0.1:9090  grafana http://127.0.0.1:3000"

up-gpu: compose-preflight ## Same with GPU backends and the DCGM exporter (NVIDIA Container Toolkit)
	TORCHSERVE_GPU=$(TORCHSERVE_GPU) TFSERVING_GPU=$(TFSERVING_GPU) $(COMPOSE_GPU) up -d --build
	@echo "gateway http://127.0.0.1:8000  prometheus http://127.0.0.1:9090  grafana http://127.0.0.1:3000"

# The first thing to run on a machine with Docker. A throwaway API key in $(SMOKE_DIR)/ (the
# stack restarts with it; `make up` with your own keys afterwards), then deploy/smoke.py: one
# request per framework through every front door, Prometheus scraping all three, Grafana up.
smoke: ## Start the CPU stack and check both frameworks through every front door (Docker)
	$(DEPLOY_PYTHON) deploy/smoke.py prepare $(SMOKE_DIR)
	set -a && . $(SMOKE_DIR)/env && set +a && $(MAKE) --no-print-directory up \
		&& $(DEPLOY_PYTHON) deploy/smoke.py check --api-key-file $(SMOKE_DIR)/api-key \
		|| { $(COMPOSE) ps -a; $(COMPOSE) logs --tail 40; echo "make smoke FAILED" >&2; exit 1; }

smoke-gpu: ## The same with the GPU stack (make up-gpu)
	$(DEPLOY_PYTHON) deploy/smoke.py prepare $(SMOKE_DIR)
	set -a && . $(SMOKE_DIR)/env && set +a && $(MAKE) --no-print-directory up-gpu \
		&& $(DEPLOY_PYTHON) deploy/smoke.py check --api-key-file $(SMOKE_DIR)/api-key \
		|| { $(COMPOSE_GPU) ps -a; $(COMPOSE_GPU) logs --tail 40; echo "make smoke-gpu FAILED" >&2; exit 1; }

# Compose interpolates the whole file even to stop it: placeholders stand in for the required
# variables, which `down` never uses.
down: ## Stop and remove the stack's containers (CPU or GPU); volumes are kept
	GRAFANA_ADMIN_PASSWORD="$${GRAFANA_ADMIN_PASSWORD:-unused}" \
	DUOSERVE_API_KEYS_PATH="$${DUOSERVE_API_KEYS_PATH:-/dev/null}" \
		$(COMPOSE_GPU) down --remove-orphans

k8s-render: ## Print the manifests of k8s/overlays/$(OVERLAY)
	$(KUBECTL) kustomize k8s/overlays/$(OVERLAY)

k8s-apply: ## kubectl apply -k k8s/overlays/$(OVERLAY) (create Secret duoserve-api-keys first)
	$(KUBECTL) apply -k k8s/overlays/$(OVERLAY)

k8s-check: ## Offline checks: render, schema-validate (1.30, 1.32) and policy-check every overlay
	$(DEPLOY_PYTHON) -m pytest -q tests/deploy

k8s-generate: ## Regenerate k8s/components/monitoring from deploy/prometheus and deploy/grafana
	$(DEPLOY_PYTHON) k8s/components/monitoring/generate.py
