// Self-test kernels of the host SIMT layer (see simt_selftest.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "simt_host.h"

namespace dropit {
namespace simt_test {

// Runs one primitive in every thread of `grid` blocks of `threads`; returns
// each thread's result, block-major.
std::vector<uint64_t> exchange(const std::string& op, int threads, int arg, int64_t grid);
// Runs a kernel that misuses the layer; throws std::runtime_error.
void misuse(const std::string& what);
// Runs a one-warp kernel with one memory instruction of a known pattern, profiled.
simt::host::LaunchStats profile_case(const std::string& what);

}  // namespace simt_test
}  // namespace dropit
