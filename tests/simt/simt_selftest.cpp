// Small kernels that exercise the host SIMT layer's primitives and the bitmap
// helpers directly, for tests/test_simt_layer.py.
#define DROPIT_SIMT_HOST 1
#include "simt_selftest.h"

#include <memory>
#include <vector>

#include "cuda/bitmap.cuh"
#include "cuda/simt.cuh"

namespace dropit {
namespace simt_test {

std::vector<uint64_t> exchange(const std::string& op, int threads, int arg, int64_t grid) {
  std::vector<uint64_t> out(static_cast<size_t>(threads * grid), 0);
  simt::host::LaunchOptions opt;
  std::vector<uint64_t> table(static_cast<size_t>(2 * threads));  // "async_copy"'s global source
  for (int i = 0; i < 2 * threads; ++i) table[static_cast<size_t>(i)] = 5000u + 3u * i;
  opt.buffers = {{table.data(), table.size() * sizeof(uint64_t), false, "table"}};
  simt::host::launch(grid, threads, 0, [&] {
    const int t = simt::thread_idx();
    const uint64_t v = 1000u * static_cast<uint64_t>(simt::block_idx()) + 7u * t + 1u;
    uint64_t r = 0;
    if (op == "ballot") {
      r = simt::ballot(t % 3 == 0 || t % 32 == arg);
    } else if (op == "match_any") {
      r = simt::match_any(static_cast<uint32_t>((t % 32) % (arg > 0 ? arg : 1)));
    } else if (op == "add_min_s16x2" || op == "max_s16x2") {
      // Three pseudo-random words of t and arg (the test recomputes them).
      const uint32_t a = static_cast<uint32_t>(t) * 2654435761u + static_cast<uint32_t>(arg);
      const uint32_t b = a * 2246822519u + 3266489917u;
      const uint32_t c = b * 668265263u + 374761393u;
      r = op == "max_s16x2" ? simt::max_s16x2(a, b) : simt::add_min_s16x2(a, b, c);
    } else if (op == "reduce_max") {
      r = simt::reduce_max(static_cast<uint32_t>((t * 37 + arg) % 101));
    } else if (op == "shfl") {
      r = simt::shfl(v, (t * 5 + arg) % 32);
    } else if (op == "shfl_up") {
      r = simt::shfl_up(v, arg);
    } else if (op == "shfl_down") {
      r = simt::shfl_down(v, arg);
    } else if (op == "shfl_xor") {
      r = simt::shfl_xor(v, arg);
    } else if (op == "scan") {
      r = bitmap::warp_inclusive_scan(static_cast<uint32_t>(t % 32 + arg));
    } else if (op == "block_scan") {
      DROPIT_SHARED(uint32_t, slots, 32);
      uint32_t total = 0;
      const uint32_t before = bitmap::block_exclusive_scan<uint32_t>(
          static_cast<uint32_t>(t % 7 + arg), slots, &total, [] { simt::sync(); });
      r = (static_cast<uint64_t>(total) << 32) | before;
    } else if (op == "shared") {
      // Each thread writes its slot, a barrier, then reads its neighbour's.
      DROPIT_SHARED(uint64_t, cells, 1024);
      cells[t] = v;
      simt::sync();
      r = cells[(t + arg) % simt::block_dim()];
    } else if (op == "async_copy") {
      // Each thread copies 16 bytes of a global table asynchronously, waits, a barrier, then reads
      // the second half of the copy of the thread `arg` after it.
      DROPIT_SHARED(uint64_t, cells, 2 * 1024);
      simt::copy_async16(cells + 2 * t, simt::gptr<const uint64_t>(table.data()) + 2 * t);
      simt::copy_async_wait_all();
      simt::sync();
      r = cells[2 * ((t + arg) % simt::block_dim()) + 1];
    } else if (op == "dims") {
      r = (static_cast<uint64_t>(simt::grid_dim()) << 48) | (static_cast<uint64_t>(simt::block_idx()) << 32) |
          (static_cast<uint64_t>(simt::block_dim()) << 16) | static_cast<uint64_t>(t);
    }
    out[static_cast<size_t>(simt::block_idx() * threads + t)] = r;
  }, opt);
  return out;
}

void misuse(const std::string& what) {
  // A global buffer of 64 floats the kernels may read, and one they may write.
  std::vector<float> in(64, 1.0f), out(64, 0.0f);
  simt::host::LaunchOptions opt;
  opt.buffers = {{in.data(), in.size() * sizeof(float), false, "in"}, {out.data(), out.size() * sizeof(float), true, "out"}};
  const simt::gptr<const float> src(in.data());
  const simt::gptr<float> dst(out.data());
  simt::host::launch(1, 64, 0, [&] {
    const int t = simt::thread_idx();
    if (what == "global_past_end") {
      dst[t] = src[t + 1];  // thread 63 reads in[64]
    } else if (what == "global_before_start") {
      dst[t] = src[t - 1];
    } else if (what == "store_to_read_only") {
      simt::gptr<float>(in.data())[t] = 2.0f;
    } else if (what == "shared_past_end") {
      DROPIT_SHARED(float, cells, 64);
      cells[t] = 1.0f;
      simt::sync();
      dst[t] = cells[t + 1];
    } else if (what == "misaligned_vector") {
      const simt::Vec<float, 4> v = simt::load_vec<4>(src + (t % 8 == 0 ? 1 : 0));
      dst[t] = v.v[0];
    } else if (what == "misaligned_vector_store") {
      simt::store_vec(dst + 4 * (t % 15) + 2, simt::Vec<float, 4>{});  // 8-byte aligned only
    } else if (what == "misaligned_shared_vector") {
      DROPIT_SHARED(uint32_t, cells, 64);
      cells[t] = 1u;
      simt::sync();
      dst[t] = static_cast<float>(simt::load_vec<2>(cells + (t | 1)).v[0]);  // 4-byte aligned only
    } else if (what == "misaligned_scalar") {
      // A 4-byte load at a 2-byte offset: faults on a GPU like a misaligned vector.
      dst[t] = simt::gptr<const float>(reinterpret_cast<const float*>(reinterpret_cast<const char*>(in.data()) + 2))[t % 32];
    } else if (what.rfind("async_", 0) == 0 || what.rfind("misaligned_async", 0) == 0) {
      // Thread t copies 16 bytes of `in` to its own 16 bytes of `cells`.
      DROPIT_SHARED(float, cells, 4 * 64);
      const int v = t % 16;
      if (what == "misaligned_async_source") {
        simt::copy_async16(cells + 4 * t, src + (4 * v + (t == 9 ? 2 : 0)));
      } else if (what == "misaligned_async_shared") {
        simt::copy_async16(cells + (4 * t + (t == 9 ? 1 : 0)), src + 4 * v);
      } else {
        simt::copy_async16(cells + 4 * t, src + 4 * v);
      }
      if (what == "async_never_waited") return;
      if (what == "async_read_before_wait") dst[t] = cells[4 * t];
      simt::sync();  // every copy issued
      simt::copy_async_wait_all();
      if (what != "async_no_barrier") simt::sync();
      dst[t] = cells[4 * ((t + 1) % 64)];  // the next thread's copy
    } else if (what == "divergent_barrier") {
      if (t < 32) simt::sync();  // the second warp never arrives
    } else if (what == "divergent_warp_op") {
      if (t % 32 < 16) {
        simt::ballot(true);
      } else {
        simt::shfl(1u, 0);
      }
    } else if (what == "partial_warp") {
      if (t % 32 != 5) simt::ballot(true);  // lane 5 never joins
    }
  }, opt);
}

simt::host::LaunchStats profile_case(const std::string& what) {
  // 32 lanes (one warp) touch memory in one instruction each; the profile groups them. The buffer
  // starts on a 128-byte line, as allocations on a GPU do.
  struct alignas(128) Buffer {
    float v[32 * 64];
  };
  auto in = std::make_unique<Buffer>();
  simt::host::LaunchOptions opt;
  opt.profile = true;
  opt.buffers = {{in->v, sizeof(Buffer), true, "in"}};
  const simt::gptr<float> g(in->v);
  simt::host::launch(1, 32, 0, [&] {
    const int lane = simt::thread_idx();
    DROPIT_SHARED(uint32_t, cells, 32 * 32);
    if (what == "coalesced") {
      g[lane] = 2.0f;  // 128 bytes: 4 sectors
    } else if (what == "strided") {
      g[8 * lane] = 2.0f;  // a 32-byte sector each
    } else if (what == "vector") {
      simt::store_vec(g + 4 * lane, simt::Vec<float, 4>{});  // 512 bytes: 16 sectors
      (void)simt::load_vec<4>(cells + 4 * lane);  // 512 bytes: 4 passes, no conflict
    } else if (what == "bank_conflict") {
      (void)static_cast<uint32_t>(cells[32 * lane]);  // one bank, 32 words: 32 passes
    } else if (what == "broadcast") {
      (void)static_cast<uint32_t>(cells[7]);  // one word for all: 1 pass
    } else if (what == "two_way") {
      (void)static_cast<uint32_t>(cells[2 * lane]);  // 16 banks, 2 words each: 2 passes
    } else if (what == "atomic_same") {
      simt::atomic_add_shared(cells + 3, 1u);  // one address: 32 passes
    } else if (what == "atomic_spread") {
      simt::atomic_add_shared(cells + lane, 1u);  // 32 banks: 1 pass
    } else if (what == "async_copy") {
      // 512 bytes from global (16 sectors) to shared (4 passes, no conflict), one instruction.
      simt::copy_async16(cells + 4 * lane, simt::gptr<const uint32_t>(reinterpret_cast<const uint32_t*>(in->v)) + 4 * lane);
      simt::copy_async_wait_all();
    }
  }, opt);
  return simt::host::last_stats();
}

}  // namespace simt_test
}  // namespace dropit
