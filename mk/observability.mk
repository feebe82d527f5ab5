# Observability: Grafana dashboards generated from Python, Prometheus config and rules checked
# and unit-tested with promtool. Included by the top-level Makefile.
#   make dashboards         regenerate deploy/grafana/dashboards/*.json from deploy/grafana/generate.py
#   make dashboards-check   fail when the committed JSON differs from the generator's output
#   make prom-check         promtool: config, rules, and the alert unit tests

PYTHON ?= .venv/bin/python
PROMTOOL ?= promtool
PROM_DIR := deploy/prometheus

.PHONY: dashboards dashboards-check prom-check

dashboards:
	$(PYTHON) deploy/grafana/generate.py

dashboards-check:
	$(PYTHON) deploy/grafana/generate.py --check

prom-check:
	cd $(PROM_DIR) && $(PROMTOOL) check config prometheus.yml
	$(PROMTOOL) check rules $(PROM_DIR)/rules/*.yml
	$(PROMTOOL) test rules $(PROM_DIR)/tests/*.yml
