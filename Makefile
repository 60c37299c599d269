# Convenience targets; every one goes through the same installer as the README commands.
PY := .venv/bin/python
OUT := runs/bench

.PHONY: install test demo bench clean

install:
	bash install.sh

test: install
	$(PY) -m pytest -q -rs

demo: install
	.venv/bin/coel demo

# All benchmarks; each prints a table and writes JSON to $(OUT). Root is needed for net/redeploy.
bench: install
	mkdir -p $(OUT)
	$(PY) benchmarks/quant_kernels.py --json-out $(OUT)/quant_kernels.json
	$(PY) benchmarks/quant_quality.py --json-out $(OUT)/quant_quality.json
	$(PY) benchmarks/hop_overhead.py --json-out $(OUT)/hop_overhead.json
	$(PY) benchmarks/agent_throughput.py --json-out $(OUT)/agent_throughput.json
	$(PY) benchmarks/compression.py --json-out $(OUT)/compression.json
	$(PY) benchmarks/planner_scale.py --json-out $(OUT)/planner_scale.json
	$(PY) benchmarks/strategies.py --json-out $(OUT)/strategies.json
	$(PY) benchmarks/runtime_failover.py --json-out $(OUT)/runtime_failover.json
	$(PY) benchmarks/api_overhead.py --json-out $(OUT)/api_overhead.json
	$(PY) benchmarks/net.py --json-out $(OUT)/net.json
	$(PY) benchmarks/redeploy.py --out $(OUT)/redeploy-runs

clean: install
	.venv/bin/coel clean
