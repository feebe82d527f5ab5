# `make bench`: the reference benchmark (bench/reference.py) on this machine. It starts real
# TorchServe, the TF Serving stand-in and gateway subprocesses, measures the gateway against the
# backends called directly (interleaved), then the embedded backend with and without
# micro-batching; then the scale-out, proxy-cost (gateway beside nginx) and tracing-cost benchmarks. Results go
# to bench-results/ and the generated sections of BENCHMARKS.md.
# BENCH_ARGS passes options on, e.g. BENCH_ARGS="--model resnet" or "--torchserve-batching".
BENCH_ARGS ?=

.PHONY: bench bench-floor bench-scale-out bench-proxy bench-tracing

bench: setup models
	$(PY) bench/reference.py --out bench-results --markdown BENCHMARKS.md $(BENCH_ARGS)
	$(PY) bench/scale_out.py --out bench-results --markdown BENCHMARKS.md
	$(PY) bench/proxy_cost.py --out bench-results --markdown BENCHMARKS.md
	$(PY) bench/tracing_cost.py

# The gateway beside nginx (one worker, upstream keep-alive), both in front of one real
# TorchServe, wrk as the client: c=1 latency, c=8 throughput, each proxy's CPU per request and
# TorchServe's batch sizes; then both in front of bench/stub_backend.py (what each proxy itself
# costs). Needs nginx and wrk (Debian: nginx-light, wrk).
bench-proxy: setup models
	$(PY) bench/proxy_cost.py --out bench-results --markdown BENCHMARKS.md

# One gateway in front of 1, 2 and 3 latency-bound backend replicas; and the gateway's CPU per
# request in front of one backend, HEAD against the revision before replica sets (same run).
bench-scale-out: setup models
	$(PY) bench/scale_out.py --out bench-results --markdown BENCHMARKS.md

# DuoServe vs a bare FastAPI + aiohttp proxy, alternated: in front of a backend that costs
# nothing (each proxy's own CPU), then in front of the same real TorchServe.
bench-floor: setup models
	$(PY) bench/floor.py --backend stub
	$(PY) bench/floor.py --backend torchserve

# What tracing costs: the gateway's CPU per request with tracing off, at 1 % and at 100 %
# sampling (in front of the stub backend, exporting to a local OTLP receiver), alternated.
bench-tracing: setup models
	$(PY) bench/tracing_cost.py
