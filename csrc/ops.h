// Declarations shared by the op registration and the per-device kernels.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "dropit.h"

namespace dropit {

// The dtypes the kernels take: the floating ones, handled as bit patterns.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Argument checks shared by every backend, so CPU and CUDA fail alike.
// Returns the geometry of the packed tensor.
ChunkGeometry check_pack_args(const at::Tensor& x, double gamma, int64_t chunk);
ChunkGeometry check_unpack_args(const at::Tensor& values, const at::Tensor& index, int64_t numel,
                                double gamma, int64_t chunk, bool bitmap);

// Calls fn(Bits{}) with the unsigned integer type of t's width: kernels work on bit patterns,
// so one instantiation serves every floating dtype of that width.
template <typename Fn>
void dispatch_bits(at::ScalarType t, Fn&& fn) {
  switch (at::elementSize(t)) {
    case 2: fn(uint16_t{}); break;
    case 4: fn(uint32_t{}); break;
    default: fn(uint64_t{}); break;
  }
}

// Empty outputs of the right size for pack; shared by every backend.
std::tuple<at::Tensor, at::Tensor> allocate_packed(const at::Tensor& x, const ChunkGeometry& g,
                                                   bool bitmap);

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& x, double gamma, int64_t chunk,
                                            bool bitmap, std::optional<int64_t> seed);
at::Tensor unpack_cpu(const at::Tensor& values, const at::Tensor& index, int64_t numel,
                      double gamma, int64_t chunk, bool bitmap);

}  // namespace dropit
