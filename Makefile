# The two set-up commands of README.md. Each creates .venv if needed, installs astrea
# (building astrea._C), then runs its job.
VENV ?= .venv

.PHONY: demo test test-main test-compat test-matrix benchmark info clean

demo:
	bash scripts/bootstrap.sh
	$(VENV)/bin/astrea demo --out runs/demo

# The suite, then its second pass under triton 3.6 / every CPU code path capped to AVX2 / one thread.
test:
	bash scripts/bootstrap.sh
	bash scripts/run_tests.sh
	bash scripts/run_compat_tests.sh

test-main:
	bash scripts/bootstrap.sh
	bash scripts/run_tests.sh

test-compat:
	bash scripts/bootstrap.sh
	bash scripts/run_compat_tests.sh

# Every CPU instruction set this host offers (ATen, MKL, oneDNN capped together) x 1 and 2 threads.
test-matrix:
	bash scripts/bootstrap.sh
	bash scripts/run_capability_matrix.sh

benchmark:
	bash scripts/bootstrap.sh
	$(VENV)/bin/python -m pytest benchmarks --benchmark-only

info:
	$(VENV)/bin/python -m astrea info

clean:
	rm -rf build *.egg-info astrea/_C*.so astrea/_build_info.json
