// Op schemas, shared argument checks and CPU registration (the Python module: python_module.cpp).
#include <string>

#include "ops.h"

namespace dropit {

static void check_gamma_chunk(double gamma, int64_t chunk) {
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma < 1.0, "gamma must be in [0, 1), got ", gamma);
  TORCH_CHECK_VALUE(chunk >= 1 && chunk <= kMaxChunk, "chunk must be in [1, ", kMaxChunk,
                    "], got ", chunk);
}

ChunkGeometry check_pack_args(const at::Tensor& x, double gamma, int64_t chunk) {
  check_gamma_chunk(gamma, chunk);
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && x.is_contiguous(), "x must be 1-D and contiguous");
  return ChunkGeometry(x.numel(), chunk, gamma);
}

ChunkGeometry check_unpack_args(const at::Tensor& values, const at::Tensor& index, int64_t numel,
                                double gamma, int64_t chunk, bool bitmap) {
  check_gamma_chunk(gamma, chunk);
  TORCH_CHECK_VALUE(numel >= 0, "numel must be >= 0, got ", numel);
  TORCH_CHECK_TYPE(is_supported_float(values.scalar_type()),
                   "values must be float16, bfloat16, float32 or float64, got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.is_contiguous(), "values must be 1-D and contiguous");
  TORCH_CHECK_VALUE(index.dim() == 1 && index.is_contiguous(), "index must be 1-D and contiguous");
  TORCH_CHECK_VALUE(values.device() == index.device(), "values and index must be on one device");
  ChunkGeometry g(numel, chunk, gamma);
  TORCH_CHECK_VALUE(values.numel() == g.total_kept(), "values holds ", values.numel(),
                    " elements but ", g.total_kept(), " are kept from ", numel,
                    " elements at gamma=", gamma, ", chunk=", chunk);
  if (bitmap) {
    TORCH_CHECK_TYPE(index.scalar_type() == at::kInt, "a bitmap index must be int32, got ",
                     index.scalar_type());
    TORCH_CHECK_VALUE(index.numel() == g.bitmap_words(), "bitmap holds ", index.numel(),
                      " words but ", g.bitmap_words(), " are expected");
  } else {
    TORCH_CHECK_TYPE(index.scalar_type() == at::kUInt16, "an offsets index must be uint16, got ",
                     index.scalar_type());
    TORCH_CHECK_VALUE(index.numel() == g.total_kept(), "offsets holds ", index.numel(),
                      " entries but ", g.total_kept(), " are expected");
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor> allocate_packed(const at::Tensor& x, const ChunkGeometry& g,
                                                   bool bitmap) {
  at::Tensor values = at::empty({g.total_kept()}, x.options());
  at::Tensor index = bitmap ? at::empty({g.bitmap_words()}, x.options().dtype(at::kInt))
                            : at::empty({g.total_kept()}, x.options().dtype(at::kUInt16));
  return {values, index};
}

// How the library was compiled, for dropit_cuda.extension_info().
static std::string build_info() {
  std::string info = "cuda=";
#ifdef DROPIT_WITH_CUDA
  info += "1";
#else
  info += "0";
#endif
  // Whether the CPU kernels' at::parallel_for can use more than one thread (see _build.py).
#ifdef _OPENMP
  info += "|openmp=1";
#else
  info += "|openmp=0";
#endif
#ifdef DROPIT_CUDA_ARCHS  // a bare comma-separated list: quotes don't survive every build tool
#define DROPIT_STRINGIFY(...) #__VA_ARGS__
#define DROPIT_STRING(...) DROPIT_STRINGIFY(__VA_ARGS__)
  info += "|archs=" DROPIT_STRING(DROPIT_CUDA_ARCHS);
#endif
  return info;
}

}  // namespace dropit

TORCH_LIBRARY(dropit_cuda, m) {
  // x: 1-D, in the memory order of the user's tensor. seed selects the
  // "random" strategy's hashed key instead of the magnitude key. numel is a SymInt so that
  // torch.compile(dynamic=True) keeps it symbolic (an int would specialise the batch size).
  m.def("pack(Tensor x, float gamma, int chunk, bool bitmap, int? seed=None) -> (Tensor, Tensor)");
  m.def("unpack(Tensor values, Tensor index, SymInt numel, float gamma, int chunk, bool bitmap) -> Tensor");
  // The eager products with their native autograd nodes (packed_products.cpp): F.linear and
  // aten.convolution that keep their input as `values` and `index` say: both given, a pack of it;
  // `values` alone, the input itself; neither, packed here in its memory order (0 contiguous,
  // 1 channels_last, 2 channels_last_3d; the random strategy's key where `seed` is given) and
  // returned beside the output (for the forward's pack cache; empty tensors where it was given).
  // `cast`: the dtype autocast casts the weight to, inside the op. `weight_t`: `weight` is W of
  // x @ W (addmm, mm, matmul against a weight): linear(x, W.t()), without the view's autograd node.
  m.def("linear_dropit(Tensor x, Tensor weight, Tensor? bias, Tensor? values, Tensor? index, float gamma, "
        "int chunk, bool bitmap, int memory_order, int? seed, ScalarType? cast, bool weight_t=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv_dropit(Tensor x, Tensor weight, Tensor? bias, Tensor? values, Tensor? index, float gamma, "
        "int chunk, bool bitmap, int memory_order, int? seed, ScalarType? cast, int[] stride, int[] padding, "
        "int[] dilation, bool transposed, int[] output_padding, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("build_info", &dropit::build_info);
}

TORCH_LIBRARY_IMPL(dropit_cuda, CPU, m) {
  m.impl("pack", &dropit::pack_cpu);
  m.impl("unpack", &dropit::unpack_cpu);
}
