// Each parser's fuzz entry point. `make fuzz` links these with libFuzzer (clang); the regular
// test build links them with replay_main.cc, which runs every file of the corpus once.
#pragma once
#include <cstddef>
#include <cstdint>
