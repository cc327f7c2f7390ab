// The `weft` command line: one binary, one subcommand per role or operator verb.
#pragma once

namespace weft {

// Parses argv, runs the subcommand, returns the process exit code. Errors are printed, not thrown.
int run_cli(int argc, char** argv);

}  // namespace weft
