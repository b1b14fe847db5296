// Python bindings of the test-only extension: the CUDA kernel bodies run on CPU
// tensors under the host SIMT layer.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>

#include "ops.h"
#include "simt_kernels.h"
#include "simt_selftest.h"

namespace {

using dropit::ChunkGeometry;
using dropit::simt_test::PackJob;
using dropit::simt_test::UnpackJob;

// p moved by `bytes` (may point outside the allocation; only offsets back inside are used).
void* shifted(const void* p, int64_t bytes) {
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes));
}

// A tensor's memory as a buffer the kernel may touch (writable or not).
dropit::simt::host::LaunchOptions::Buffer buffer(const at::Tensor& t, bool writable, const char* name) {
  return {t.numel() > 0 ? t.const_data_ptr() : nullptr, static_cast<size_t>(t.nbytes()), writable, name};
}

dropit::simt::host::LaunchOptions options(int64_t stack_kb, const std::string& order, bool profile) {
  using Opt = dropit::simt::host::LaunchOptions;
  Opt o;
  o.profile = profile;
  o.stack_bytes = static_cast<size_t>(stack_kb) * 1024;
  if (order == "forward") {
    o.order = Opt::Order::kForward;
  } else if (order == "reverse") {
    o.order = Opt::Order::kReverse;
  } else if (order.rfind("shuffled:", 0) == 0) {
    o.order = Opt::Order::kShuffled;
    o.shuffle_seed = std::stoull(order.substr(9));
  } else {
    TORCH_CHECK(false, "order must be forward, reverse or shuffled:<seed>, got ", order);
  }
  return o;
}

std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& x, double gamma, int64_t chunk, bool bitmap,
                                        std::optional<int64_t> seed, int64_t threads, int64_t source,
                                        int64_t smem_limit, int64_t grid, int64_t drop_barrier,
                                        std::string order, int64_t stack_kb, int64_t start, bool profile) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1 && x.is_contiguous() && dropit::is_supported_float(x.scalar_type()),
              "x must be a 1-D contiguous floating CPU tensor");
  TORCH_CHECK(gamma >= 0.0 && gamma < 1.0 && chunk >= 1 && chunk <= dropit::kMaxChunk, "bad gamma/chunk");
  // `start` > 0: x holds elements start.. of a tensor of start + x.numel()
  // elements (start a multiple of chunk); only the chunks from start are run.
  TORCH_CHECK(start >= 0 && start % chunk == 0, "start must be a multiple of chunk");
  ChunkGeometry g(start + x.numel(), chunk, gamma);
  const int64_t c0 = start / chunk;
  const int64_t kept0 = c0 * g.keep, words0 = c0 * g.words;
  at::Tensor values = at::empty({g.total_kept() - kept0}, x.options());
  at::Tensor index = bitmap ? at::empty({g.bitmap_words() - words0}, x.options().dtype(at::kInt))
                            : at::empty({g.total_kept() - kept0}, x.options().dtype(at::kUInt16));
  // Poison the outputs: every byte must be written by the kernel.
  if (values.numel() > 0) values.view(at::kByte).fill_(0xCD);
  if (index.numel() > 0) index.view(at::kByte).fill_(0xCD);
  PackJob j;
  j.elem_bytes = static_cast<int>(x.element_size());
  // Pointers as if the whole tensor were there: the kernels index them with int64 offsets.
  j.x = shifted(x.const_data_ptr(), -start * x.element_size());
  j.values = shifted(values.data_ptr(), -kept0 * x.element_size());
  j.bitmap = bitmap ? static_cast<int32_t*>(shifted(index.data_ptr(), -words0 * 4)) : nullptr;
  j.offsets = bitmap ? nullptr : static_cast<uint16_t*>(shifted(index.data_ptr(), -kept0 * 2));
  j.geometry = g;
  j.random = seed.has_value();
  j.seed = seed.has_value() ? static_cast<uint64_t>(*seed) : 0u;
  j.threads = static_cast<int>(threads);
  j.source = static_cast<int>(source);
  j.smem_limit = static_cast<size_t>(smem_limit);
  j.grid = grid;
  j.options = options(stack_kb, order, profile);
  j.options.first_block = c0;
  j.options.buffers = {buffer(x, false, "x"), buffer(values, true, "values"),
                       buffer(index, true, bitmap ? "bitmap" : "offsets")};
  j.drop_barrier = static_cast<int>(drop_barrier);
  dropit::simt_test::pack_kernels(j);
  return {values, index};
}

at::Tensor unpack(const at::Tensor& values, const at::Tensor& index, int64_t numel, double gamma,
                  int64_t chunk, bool bitmap, int64_t threads, int64_t grid, int64_t drop_barrier, std::string order,
                  int64_t stack_kb, int64_t start, bool profile) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 1 && values.is_contiguous() &&
                  dropit::is_supported_float(values.scalar_type()),
              "values must be a 1-D contiguous floating CPU tensor");
  // `start` > 0: values/index/out are the parts from element `start` on (a multiple of chunk).
  TORCH_CHECK(start >= 0 && start % chunk == 0 && start <= numel, "start must be a multiple of chunk");
  ChunkGeometry g(numel, chunk, gamma);
  const int64_t c0 = start / chunk;
  const int64_t kept0 = c0 * g.keep, words0 = c0 * g.words;
  TORCH_CHECK(values.numel() == g.total_kept() - kept0, "values has the wrong length");
  if (bitmap) {
    TORCH_CHECK(index.scalar_type() == at::kInt && index.numel() == g.bitmap_words() - words0, "bad bitmap");
  } else {
    TORCH_CHECK(index.scalar_type() == at::kUInt16 && index.numel() == g.total_kept() - kept0, "bad offsets");
  }
  at::Tensor out = at::empty({numel - start}, values.options());
  if (out.numel() > 0) out.view(at::kByte).fill_(0xCD);
  UnpackJob j;
  j.elem_bytes = static_cast<int>(values.element_size());
  const int64_t es = values.element_size();
  j.values = shifted(values.const_data_ptr(), -kept0 * es);
  j.bitmap = bitmap ? static_cast<const int32_t*>(shifted(index.const_data_ptr(), -words0 * 4)) : nullptr;
  j.offsets = bitmap ? nullptr : static_cast<const uint16_t*>(shifted(index.const_data_ptr(), -kept0 * 2));
  j.out = shifted(out.data_ptr(), -start * es);
  j.geometry = g;
  j.threads = static_cast<int>(threads);
  j.grid = grid;
  j.drop_barrier = static_cast<int>(drop_barrier);
  j.options = options(stack_kb, order, profile);
  j.options.first_block = c0;
  j.options.buffers = {buffer(values, false, "values"), buffer(index, false, bitmap ? "bitmap" : "offsets"),
                       buffer(out, true, "out")};
  dropit::simt_test::unpack_kernels(j);
  return out;
}

// The production launch plan of pack for a tensor of `numel` elements.
py::dict pack_plan(int64_t numel, double gamma, int64_t chunk, int64_t elem_bytes, bool random, int64_t smem_limit) {
  PackJob j;
  j.elem_bytes = static_cast<int>(elem_bytes);
  j.geometry = ChunkGeometry(numel, chunk, gamma);
  j.random = random;
  j.smem_limit = static_cast<size_t>(smem_limit);
  const auto plan = dropit::simt_test::pack_plan_of(j);
  py::dict d;
  d["threads"] = plan.threads;
  d["source"] = plan.source == 0 ? "shared" : (plan.source == 1 ? "global" : "random");
  d["dynamic_smem"] = plan.dynamic_smem;
  d["per_warp"] = plan.per_warp;
  return d;
}

py::dict stats_dict(const dropit::simt::host::LaunchStats& s) {
  py::dict d;
#define DROPIT_STAT(name) d[#name] = s.name
  DROPIT_STAT(blocks);
  DROPIT_STAT(switches);
  DROPIT_STAT(barriers);
  DROPIT_STAT(barrier_warps);
  DROPIT_STAT(warp_ops);
  DROPIT_STAT(ballots);
  DROPIT_STAT(shuffles);
  DROPIT_STAT(reductions);
  DROPIT_STAT(matches);
  DROPIT_STAT(warp_syncs);
  DROPIT_STAT(global_loads);
  DROPIT_STAT(global_stores);
  DROPIT_STAT(global_load_bytes);
  DROPIT_STAT(global_store_bytes);
  DROPIT_STAT(shared_loads);
  DROPIT_STAT(shared_stores);
  DROPIT_STAT(shared_atomics);
  DROPIT_STAT(shared_load_bytes);
  DROPIT_STAT(shared_store_bytes);
  DROPIT_STAT(global_load_instr);
  DROPIT_STAT(global_store_instr);
  DROPIT_STAT(global_load_sectors);
  DROPIT_STAT(global_store_sectors);
  DROPIT_STAT(global_load_distinct_bytes);
  DROPIT_STAT(global_store_distinct_bytes);
  DROPIT_STAT(shared_load_instr);
  DROPIT_STAT(shared_store_instr);
  DROPIT_STAT(shared_atomic_instr);
  DROPIT_STAT(shared_load_wavefronts);
  DROPIT_STAT(shared_store_wavefronts);
  DROPIT_STAT(shared_atomic_wavefronts);
  DROPIT_STAT(shared_conflict_passes);
  DROPIT_STAT(async_copies);
  DROPIT_STAT(async_copy_instr);
#undef DROPIT_STAT
  static const char* kKinds[] = {"global load", "global store", "shared load", "shared store", "shared atomic",
                                 "vote", "shuffle", "match", "warp barrier", "async copy", "reduce"};
  py::list sites;
  for (const auto& site : s.sites) {
    sites.append(py::make_tuple(reinterpret_cast<uintptr_t>(site.address), kKinds[static_cast<int>(site.kind)],
                                site.warp_instructions));
  }
  d["sites"] = sites;
  return d;
}

py::dict last_stats() { return stats_dict(dropit::simt::host::last_stats()); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dropit_cuda's CUDA kernel bodies run on CPU tensors by the host SIMT layer (tests only)";
  m.def("pack", &pack, py::arg("x"), py::arg("gamma"), py::arg("chunk"), py::arg("bitmap"),
        py::arg("seed") = py::none(), py::arg("threads") = 0, py::arg("source") = -1,
        py::arg("smem_limit") = 227 * 1024, py::arg("grid") = 0, py::arg("drop_barrier") = 0,
        py::arg("order") = "forward", py::arg("stack_kb") = 64,
        py::arg("start") = 0, py::arg("profile") = false, py::call_guard<py::gil_scoped_release>());
  m.def("unpack", &unpack, py::arg("values"), py::arg("index"), py::arg("numel"), py::arg("gamma"),
        py::arg("chunk"), py::arg("bitmap"), py::arg("threads") = 0, py::arg("grid") = 0,
        py::arg("drop_barrier") = 0, py::arg("order") = "forward", py::arg("stack_kb") = 64, py::arg("start") = 0,
        py::arg("profile") = false, py::call_guard<py::gil_scoped_release>());
  m.def("last_stats", &last_stats);
  m.def("last_barrier_ids", &dropit::simt_test::last_barrier_ids,
        "the barrier ids the last pack or unpack run called, sorted");
  m.def("pack_plan", &pack_plan, py::arg("numel"), py::arg("gamma"), py::arg("chunk"), py::arg("elem_bytes"),
        py::arg("random") = false, py::arg("smem_limit") = 227 * 1024);
  m.def("exchange", &dropit::simt_test::exchange, py::arg("op"), py::arg("threads"), py::arg("arg") = 0,
        py::arg("grid") = 1);
  m.def("misuse", &dropit::simt_test::misuse, py::arg("what"));
  m.def("profile_case", [](const std::string& what) { return stats_dict(dropit::simt_test::profile_case(what)); },
        py::arg("what"));
}
