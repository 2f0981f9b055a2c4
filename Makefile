# The two set-up commands of README.md. Each creates .venv if needed, installs astrea
# (building astrea._C), then runs its job.
VENV ?= .venv

.PHONY: demo test benchmark info clean

demo:
	bash scripts/bootstrap.sh
	$(VENV)/bin/astrea demo --out runs/demo

test:
	bash scripts/bootstrap.sh
	bash scripts/run_tests.sh

benchmark:
	bash scripts/bootstrap.sh
	$(VENV)/bin/python -m pytest benchmarks --benchmark-only

info:
	$(VENV)/bin/python -m astrea info

clean:
	rm -rf build *.egg-info astrea/_C*.so astrea/_build_info.json
