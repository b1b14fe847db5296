"""The host SIMT layer's primitives and the warp-ballot helpers (csrc/cuda/bitmap.cuh), against
results worked out here from their CUDA definitions."""

import pytest

from simt.build import load


@pytest.fixture(scope="module")
def simt():
    return load()


def values(threads, grid=1):
    return [[1000 * b + 7 * t + 1 for t in range(threads)] for b in range(grid)]


@pytest.mark.parametrize("threads", [32, 96])
def test_ballot_and_match_any(simt, threads):
    for arg in (0, 5, 31):
        got = simt.exchange("ballot", threads, arg)
        for t in range(threads):
            w = t // 32
            want = sum(1 << l for l in range(32) if (32 * w + l) % 3 == 0 or l == arg)
            assert got[t] == want
    for arg in (1, 3, 32):
        got = simt.exchange("match_any", threads, arg)
        for t in range(threads):
            mine = (t % 32) % arg
            assert got[t] == sum(1 << l for l in range(32) if l % arg == mine)


def halves(word):
    """The two signed 16-bit halves of a 32-bit word, low first."""
    return [((word >> at) & 0xFFFF) - (0x10000 if (word >> at) & 0x8000 else 0) for at in (0, 16)]


def word(halves_):
    return sum((h & 0xFFFF) << at for h, at in zip(halves_, (0, 16)))


@pytest.mark.parametrize("op", ["add_min_s16x2", "max_s16x2"])
def test_packed_16_bit_min_max(simt, op):
    # CUDA's __viaddmin_s16x2 (per signed half: min(a + b, c), the add wrapping) and __vmaxs2.
    m = 1 << 32
    for arg in (0, 1, 77):
        got = simt.exchange(op, 96, arg)
        for t in range(96):
            a = (t * 2654435761 + arg) % m
            b = (a * 2246822519 + 3266489917) % m
            c = (b * 668265263 + 374761393) % m
            if op == "max_s16x2":
                want = word([max(x, y) for x, y in zip(halves(a), halves(b))])
            else:
                wrapped = [halves(word([x + y]))[0] for x, y in zip(halves(a), halves(b))]
                want = word([min(s, z) for s, z in zip(wrapped, halves(c))])
            assert got[t] == want, (op, arg, t, hex(a), hex(b), hex(c))


def test_reduce_max(simt):
    for arg in (0, 5, 64):
        got = simt.exchange("reduce_max", 96, arg)
        for t in range(96):
            warp = range(t - t % 32, t - t % 32 + 32)
            assert got[t] == max((u * 37 + arg) % 101 for u in warp), (arg, t)


@pytest.mark.parametrize("op", ["shfl", "shfl_up", "shfl_down", "shfl_xor"])
def test_shuffles(simt, op):
    threads = 64
    v = values(threads)[0]
    for arg in (0, 1, 3, 16, 31):
        got = simt.exchange(op, threads, arg)
        for t in range(threads):
            base, lane = t - t % 32, t % 32
            if op == "shfl":
                src = (t * 5 + arg) % 32
            elif op == "shfl_up":
                src = lane - arg if lane >= arg else lane
            elif op == "shfl_down":
                src = lane + arg if lane + arg < 32 else lane
            else:
                src = lane ^ arg
            assert got[t] == v[base + src], (op, arg, t)


def test_warp_and_block_scans(simt):
    got = simt.exchange("scan", 64, 2)
    for t in range(64):
        lane = t % 32
        assert got[t] == sum(l + 2 for l in range(lane + 1))
    for threads in (32, 256, 1024):
        # Thread t contributes t % 7 + 1: the exclusive prefix in thread order, and the block's sum.
        got = simt.exchange("block_scan", threads, 1)
        total = sum(u % 7 + 1 for u in range(threads))
        for t in range(threads):
            assert got[t] >> 32 == total
            assert got[t] & 0xFFFFFFFF == sum(u % 7 + 1 for u in range(t))


def test_shared_memory_and_barrier(simt):
    # Reads after the barrier see every other thread's write, in every block.
    for threads, grid in ((64, 3), (1024, 1)):
        v = values(threads, grid)
        got = simt.exchange("shared", threads, 33, grid)
        for b in range(grid):
            for t in range(threads):
                assert got[b * threads + t] == v[b][(t + 33) % threads]


def test_async_copies_land_at_the_wait(simt):
    # After its wait and a barrier, every thread reads what another thread copied from global memory.
    for threads, arg in ((64, 1), (256, 37)):
        got = simt.exchange("async_copy", threads, arg)
        for t in range(threads):
            assert got[t] == 5000 + 3 * (2 * ((t + arg) % threads) + 1)


def test_indices(simt):
    got = simt.exchange("dims", 96, 0, 4)
    for b in range(4):
        for t in range(96):
            assert got[b * 96 + t] == (4 << 48) | (b << 32) | (96 << 16) | t


@pytest.mark.parametrize("what,message", [
    ("divergent_barrier", "barrier"),
    ("divergent_warp_op", "different warp intrinsics"),
    ("partial_warp", "deadlock"),
    ("global_past_end", "global load of 4 bytes .* outside every buffer"),
    ("global_before_start", "global load of 4 bytes .* outside every buffer"),
    ("store_to_read_only", "global store .* read-only buffer in"),
    ("shared_past_end", "shared load of 4 bytes .* outside the block's shared memory"),
    ("misaligned_vector", "global load of 16 bytes .* misaligned"),
    ("misaligned_vector_store", "global store of 16 bytes .* misaligned"),
    ("misaligned_shared_vector", "shared load of 8 bytes .* misaligned"),
    ("misaligned_scalar", "global load of 4 bytes .* misaligned"),
    # Asynchronous copies: checked like any 16-byte access when issued; their bytes land only at the
    # issuing thread's wait, and touching them before that (or, for another thread, before a
    # barrier after it) is a race the layer reports, as is a thread that never waits.
    ("misaligned_async_source", "global load of 16 bytes .* misaligned"),
    ("misaligned_async_shared", "shared store of 16 bytes .* misaligned"),
    ("async_read_before_wait", "shared load of 4 bytes .* asynchronous copy has not landed"),
    ("async_no_barrier", "shared load of 4 bytes .* thread 1's asynchronous copy has not landed"),
    ("async_never_waited", "exited with asynchronous copies it never waited for"),
])
def test_misuse_is_reported(simt, what, message):
    with pytest.raises(RuntimeError, match=message):
        simt.misuse(what)
    # The layer still works afterwards.
    assert simt.exchange("ballot", 32, 0)[0] == sum(1 << l for l in range(32) if l % 3 == 0 or l == 0)


@pytest.mark.parametrize("what,expect", [
    ("coalesced", {"global_store_instr": 1, "global_store_sectors": 4, "global_store_distinct_bytes": 128}),
    ("strided", {"global_store_instr": 1, "global_store_sectors": 32, "global_store_distinct_bytes": 128}),
    ("vector", {"global_store_instr": 1, "global_store_sectors": 16, "shared_load_instr": 1,
                "shared_load_wavefronts": 4, "shared_conflict_passes": 0}),
    ("bank_conflict", {"shared_load_instr": 1, "shared_load_wavefronts": 32, "shared_conflict_passes": 31}),
    ("broadcast", {"shared_load_instr": 1, "shared_load_wavefronts": 1, "shared_conflict_passes": 0}),
    ("two_way", {"shared_load_instr": 1, "shared_load_wavefronts": 2, "shared_conflict_passes": 1}),
    ("atomic_same", {"shared_atomic_instr": 1, "shared_atomic_wavefronts": 32, "shared_conflict_passes": 31}),
    ("atomic_spread", {"shared_atomic_instr": 1, "shared_atomic_wavefronts": 1, "shared_conflict_passes": 0}),
    ("async_copy", {"async_copy_instr": 1, "async_copies": 32, "global_load_instr": 0, "global_load_sectors": 16,
                    "global_load_distinct_bytes": 512, "shared_store_instr": 0, "shared_store_wavefronts": 4,
                    "shared_conflict_passes": 0}),
])
def test_profile_groups_lanes_into_warp_instructions(simt, what, expect):
    # One warp, one memory instruction of a known pattern: sectors and bank-conflict passes as the
    # hardware's rules give them (32-byte sectors; 32 banks of 4 bytes, 128 bytes a pass).
    stats = simt.profile_case(what)
    assert {k: stats[k] for k in expect} == expect
