# Entry points for people and CI. Everything installs what it needs first.
BUILD ?= build/release
ASAN_BUILD ?= build/asan
FUZZ_BUILD ?= build/fuzz
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps build build-asan test test-release test-asan demo bench fuzz format format-check clean

all: build

deps:
	@scripts/install-deps

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

$(ASAN_BUILD)/build.ninja:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DWEFT_SANITIZE=ON $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

build-asan: deps $(ASAN_BUILD)/build.ninja
	cmake --build $(ASAN_BUILD) -j $(JOBS)

test-release: build
	cd $(BUILD) && ctest --output-on-failure -j 1

test-asan: build-asan
	cd $(ASAN_BUILD) && WEFT_SANITIZED=1 ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j 1

# The whole suite: format check, release tests, then the same tests under ASan+UBSan.
test: deps format-check test-release test-asan
	@echo "make test: release and sanitizer suites passed"

demo: build
	@scripts/demo $(BUILD)/weft

bench: build
	@bench/run $(BUILD)/weft

fuzz: deps
	cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWEFT_FUZZ=ON \
	  -DCMAKE_CXX_COMPILER=clang++ $(CMAKE_FLAGS)
	cmake --build $(FUZZ_BUILD) -j $(JOBS)
	@echo "fuzzers are in $(FUZZ_BUILD)/test/fuzz; run e.g. $(FUZZ_BUILD)/test/fuzz/fuzz_spiffe_id test/fuzz/corpus/spiffe_id"

format:
	@git ls-files '*.cc' '*.h' | xargs clang-format -i

format-check: deps
	@git ls-files '*.cc' '*.h' | xargs -r clang-format --dry-run -Werror

clean:
	rm -rf build
