// The simulator's warp operations (the host side of warp_ops.cuh under PT_SIM), following the PTX
// ISA fragment layouts exactly (see the table in warp_ops.cuh), with the checks of sim_shim.h.
//
// A collective operation: every lane publishes its operands, member mask and call site in the
// warp's exchange slot, the warp meets at a checked barrier (the last lane to arrive verifies that
// all lanes are at the same operation and call site with the full member mask), then each lane
// computes its own results from the published values. Slots alternate between two buffers so that
// one barrier per operation is enough.
#pragma once

#include "sim_shim.h"

namespace pt {

namespace sim_detail {

using ptsim::Site;
using ptsim::self;

inline float half_bits_to_float(uint32_t bits16) {
    __half_raw raw;
    raw.x = static_cast<unsigned short>(bits16 & 0xffffu);
    return __half2float(__half(raw));
}

inline uint32_t full_mask(unsigned lanes) { return lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u); }

// The warp barrier of a collective in exchange slot `ph`.
PTSIM_NO_TSAN inline void warp_barrier(ptsim::Warp &w, unsigned ph, const Site &s) {
    using namespace ptsim;
    ThreadState &me = self();
    w.bar.file = s.file_name();
    w.bar.line = s.line();
    if (w.exited > 0) {
        char mask[16];
        std::snprintf(mask, sizeof mask, "%08x", w.masks[ph][me.lane]);
        raise_fault(FAULT_SYNC, std::string(w.op[ph][me.lane]) + " at " + where(s) + ": " + std::to_string(w.exited) +
                                    " lane(s) of the warp already returned from the kernel (member mask 0x" + mask + ")");
    }
    const uint32_t seen = w.bar.gen;
    ++me.block->progress;
    if (++w.bar.count == static_cast<int>(w.lanes)) {
        const uint32_t want = full_mask(w.lanes);
        const unsigned base = me.warp_index * 32;
        for (unsigned l = 0; l < w.lanes; ++l) {
            if (w.site_line[ph][l] != s.line() || std::strcmp(w.site_file[ph][l], s.file_name()) != 0 ||
                std::strcmp(w.op[ph][l], w.op[ph][me.lane]) != 0) {
                raise_fault(FAULT_SYNC, "divergent warp collectives: " + thread_name(static_cast<int>(base + l)) + " at " +
                                            w.op[ph][l] + " " + short_file(w.site_file[ph][l]) + ":" +
                                            std::to_string(w.site_line[ph][l]) + ", " +
                                            thread_name(static_cast<int>(me.tid)) + " at " + w.op[ph][me.lane] + " " +
                                            where(s));
            }
            if (w.masks[ph][l] != want) {
                char b[64];
                std::snprintf(b, sizeof b, "member mask 0x%08x (expected 0x%08x)", w.masks[ph][l], want);
                raise_fault(FAULT_SYNC, std::string(w.op[ph][l]) + " at " + where(s) + ": " +
                                            thread_name(static_cast<int>(base + l)) + " passes " + b +
                                            "; the simulator runs collectives of the whole warp only");
            }
        }
        w.bar.count = 0;
        ++w.bar.gen;
        ++me.block->progress;
        return;
    }
    wait_generation(w.bar, seen);
}

// Publishes `n` words of this lane, synchronises the warp, returns the slot set to read.
// (The exchange storage is the simulator's, not the kernel's memory: these functions are not
// instrumented in the ThreadSanitizer build, and a collective creates no ordering of the kernel's
// own memory, as on the GPU.)
PTSIM_NO_TSAN inline uint32_t (*exchange(const uint32_t *mine, int n, const char *op, uint32_t mask, const Site &s))[8] {
    ptsim::jitter();
    if (ptsim::launch_aborted()) ptsim::unwind_aborted();
    ptsim::ThreadState &me = ptsim::self();
    ptsim::Warp &w = *me.warp;
    const unsigned ph = me.phase;
    me.phase ^= 1u;
    for (int i = 0; i < n; ++i) w.words[ph][me.lane][i] = mine[i];
    w.masks[ph][me.lane] = mask;
    w.site_file[ph][me.lane] = s.file_name();
    w.site_line[ph][me.lane] = s.line();
    w.op[ph][me.lane] = op;
    warp_barrier(w, ph, s);
    return w.words[ph];
}

PTSIM_NO_TSAN inline const void *const *exchange_addr(const void *mine, const char *op, const Site &s) {
    ptsim::jitter();
    if (ptsim::launch_aborted()) ptsim::unwind_aborted();
    ptsim::ThreadState &me = ptsim::self();
    ptsim::Warp &w = *me.warp;
    const unsigned ph = me.phase;
    me.phase ^= 1u;
    w.addrs[ph][me.lane] = mine;
    w.masks[ph][me.lane] = 0xffffffffu;
    w.site_file[ph][me.lane] = s.file_name();
    w.site_line[ph][me.lane] = s.line();
    w.op[ph][me.lane] = op;
    warp_barrier(w, ph, s);
    return w.addrs[ph];
}

inline std::string offset_text(const void *addr) {
    const auto off = static_cast<const unsigned char *>(addr) - self().block->smem;
    return "shared-memory offset " + std::to_string(off);
}

// What the hardware requires of a shared-memory operand of `bytes` bytes: 16-byte alignment and
// lying inside the block's dynamic shared memory.
PTSIM_NO_TSAN inline void check_smem(const void *addr, size_t bytes, const char *op, const Site &s) {
    const auto *p = static_cast<const unsigned char *>(addr);
    const ptsim::Block &b = *self().block;
    if (p < b.smem || p + bytes > b.smem + b.smem_bytes) {
        ptsim::raise_fault(ptsim::FAULT_ILLEGAL_ADDRESS,
                           std::string(op) + " at " + ptsim::where(s) + " by " + ptsim::thread_name(static_cast<int>(self().tid)) +
                               ": address " + std::to_string(p - b.smem) + " bytes from the start of the block's " +
                               std::to_string(b.smem_bytes) + " bytes of dynamic shared memory (out of bounds)");
    }
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        ptsim::raise_fault(ptsim::FAULT_MISALIGNED, std::string(op) + " at " + ptsim::where(s) + " by " +
                                                        ptsim::thread_name(static_cast<int>(self().tid)) + ": " +
                                                        offset_text(addr) + " is not 16-byte aligned");
    }
}

inline ptsim::Chunk &chunk(const void *addr) {
    return self().block->shadow[static_cast<size_t>(static_cast<const unsigned char *>(addr) - self().block->smem) / 16];
}

inline std::string site_text(const char *file, uint32_t line) {
    return file ? ptsim::short_file(file) + ":" + std::to_string(line) : std::string("?");
}

// The shadow checks of one ldmatrix.x4 (lane 0 checks the warp's 32 row addresses).
PTSIM_NO_TSAN inline void check_ldmatrix_rows(const void *const *addrs, const char *op, const Site &s) {
    if (!ptsim::hazards_enabled() || self().lane != 0) return;
    ptsim::Block &b = *self().block;
    const uint32_t epoch = b.epoch;
    for (unsigned r = 0; r < 32; ++r) {
        ptsim::Chunk &k = chunk(addrs[r]);
        const int32_t owner = k.inflight_owner;
        if (owner >= 0) {
            ptsim::raise_fault(ptsim::FAULT_HAZARD,
                               std::string(op) + " at " + ptsim::where(s) + " (warp " + std::to_string(self().warp_index) +
                                   ") reads " + offset_text(addrs[r]) + " while the cp.async of " +
                                   ptsim::thread_name(owner) + " at " +
                                   site_text(k.inflight_file, k.inflight_line) +
                                   " to it is still in flight (its group was not retired by cp.async.wait_group)");
        }
        if (k.landed_epoch == epoch) {
            ptsim::raise_fault(ptsim::FAULT_HAZARD,
                               "read-after-write hazard: " + std::string(op) + " at " + ptsim::where(s) + " (warp " +
                                   std::to_string(self().warp_index) + ") reads " + offset_text(addrs[r]) +
                                   " written by the cp.async of " + ptsim::thread_name(k.writer) +
                                   " (retired at " +
                                   site_text(k.landed_file, k.landed_line) +
                                   ") with no barrier in between");
        }
        k.read_epoch = epoch;
        k.reader = static_cast<int32_t>(self().tid);
        k.read_file = s.file_name();
        k.read_line = s.line();
    }
}

// Counts the bank conflicts of one ldmatrix.x4 (checked by lane 0 for the warp): the 8 row
// addresses of each matrix must fall in 8 distinct 16-byte bank groups of shared memory.
inline std::atomic<unsigned long long> ldmatrix_bank_conflicts{0};
PTSIM_NO_TSAN inline void count_bank_conflicts(const void *const *addrs) {
    if (self().lane != 0) return;
    const auto *base = self().block->smem;
    for (unsigned i = 0; i < 4; ++i) {
        unsigned seen = 0;
        for (unsigned r = 0; r < 8; ++r) {
            const auto off = static_cast<size_t>(static_cast<const unsigned char *>(addrs[8 * i + r]) - base);
            const unsigned group = 1u << ((off / 16) % 8);
            if (seen & group) {
                ldmatrix_bank_conflicts.fetch_add(1, std::memory_order_relaxed);
                break;
            }
            seen |= group;
        }
    }
}

PTSIM_NO_TSAN inline void shadow_landed(unsigned char *dst, uint32_t epoch, const Site &s) {
    ptsim::Chunk &k = chunk(dst);
    k.inflight_owner = -1;
    k.writer = static_cast<int32_t>(self().tid);
    k.landed_file = s.file_name();
    k.landed_line = s.line();
    k.landed_epoch = epoch;
}

// Retires this thread's pending cp.async copies of groups below `threshold`.
inline void land_groups(uint64_t threshold, const Site &s) {
    auto &pend = self().pending;
    const bool shadow = ptsim::hazards_enabled();
    const uint32_t epoch = self().block->epoch;
    size_t keep = 0;
    for (size_t i = 0; i < pend.size(); ++i) {
        ptsim::Pending &c = pend[i];
        if (c.group < threshold) {
            std::memcpy(c.dst, c.data, 16);
            if (shadow) shadow_landed(c.dst, epoch, s);
        } else {
            pend[keep++] = c;
        }
    }
    pend.resize(keep);
}

// The shadow bookkeeping of a cp.async to `dst` (see cp_async_16).
PTSIM_NO_TSAN inline void shadow_cp_async(void *dst, const Site &s) {
    using namespace ptsim;
    Chunk &k = chunk(dst);
    const int32_t owner = k.inflight_owner;
    if (owner >= 0) {
        raise_fault(FAULT_HAZARD, "cp.async at " + where(s) + " by " + thread_name(static_cast<int>(self().tid)) +
                                      " writes " + offset_text(dst) + ", which the cp.async of " +
                                      thread_name(owner) + " at " +
                                      site_text(k.inflight_file,
                                                            k.inflight_line) +
                                      " still has in flight");
    }
    const uint32_t epoch = self().block->epoch;
    if (k.read_epoch == epoch) {
        raise_fault(FAULT_HAZARD, "write-after-read hazard: cp.async at " + where(s) + " by " +
                                      thread_name(static_cast<int>(self().tid)) + " refills " +
                                      offset_text(dst) + ", read by the warp of " +
                                      thread_name(k.reader) + " at " +
                                      site_text(k.read_file,
                                                            k.read_line) +
                                      " with no barrier in between");
    }
    k.inflight_owner = static_cast<int32_t>(self().tid);
    k.inflight_file = s.file_name();
    k.inflight_line = s.line();
}

// The collective part of an ldmatrix.x4: exchanges the row addresses, checks them and returns
// the rows this lane reads (plain: matrix i's row lane/4 in rows[i]; .trans: matrix i's rows
// 2(lane%4) and 2(lane%4)+1 in rows[2i], rows[2i+1]). The data reads stay in the (instrumented)
// caller: they are the kernel's shared-memory reads.
PTSIM_NO_TSAN inline void ldmatrix_rows(const void *row, const char *op, bool trans, const void *rows[8], const Site &s) {
    check_smem(row, 16, op, s);
    const void *const *addrs = exchange_addr(row, op, s);
    count_bank_conflicts(addrs);
    check_ldmatrix_rows(addrs, op, s);
    const unsigned lane = self().lane;
    for (unsigned i = 0; i < 4; ++i) {
        if (trans) {
            rows[2 * i] = addrs[8 * i + 2 * (lane % 4)];
            rows[2 * i + 1] = addrs[8 * i + 2 * (lane % 4) + 1];
        } else {
            rows[i] = addrs[8 * i + lane / 4];
        }
    }
}

} // namespace sim_detail

// D = A B + C for m16n8k16: products of fp16 values are exact in float; the 16 products of one
// output are summed in double and added to C once (tensor cores keep at least fp32 precision).
PTSIM_NO_TSAN inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                      const ptsim::Site &s = ptsim::Site::current()) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    uint32_t(*w)[8] = sim_detail::exchange(mine, 6, "mma.sync", 0xffffffffu, s);
    const unsigned lane = ptsim::self().lane, g = lane >> 2, t = lane & 3;
    auto A = [&](unsigned row, unsigned k) {
        const uint32_t word = w[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)];
        return sim_detail::half_bits_to_float(word >> (16 * (k & 1)));
    };
    auto B = [&](unsigned k, unsigned n) {
        const uint32_t word = w[n * 4 + ((k & 7) >> 1)][4 + (k >> 3)];
        return sim_detail::half_bits_to_float(word >> (16 * (k & 1)));
    };
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        double acc = 0.0;
        for (unsigned k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k) * B(k, col));
        out[i] = c[i] + static_cast<float>(acc);
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.x4: lane l reads, for matrix i, row l/4 (whose address lane 8i + l/4 gave),
// columns 2(l%4) and 2(l%4)+1.
inline void ldmatrix_x4(uint32_t r[4], const void *row, const ptsim::Site &s = ptsim::Site::current()) {
    const void *rows[8];
    sim_detail::ldmatrix_rows(row, "ldmatrix", false, rows, s);
    const unsigned lane = ptsim::self().lane;
    for (unsigned i = 0; i < 4; ++i) {
        const uint16_t *src = static_cast<const uint16_t *>(rows[i]);
        r[i] = static_cast<uint32_t>(src[2 * (lane % 4)]) | (static_cast<uint32_t>(src[2 * (lane % 4) + 1]) << 16);
    }
}

// .trans: lane l receives elements (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4) of matrix i.
inline void ldmatrix_x4_trans(uint32_t r[4], const void *row, const ptsim::Site &s = ptsim::Site::current()) {
    const void *rows[8];
    sim_detail::ldmatrix_rows(row, "ldmatrix.trans", true, rows, s);
    const unsigned lane = ptsim::self().lane;
    for (unsigned i = 0; i < 4; ++i) {
        const uint16_t *r0 = static_cast<const uint16_t *>(rows[2 * i]);
        const uint16_t *r1 = static_cast<const uint16_t *>(rows[2 * i + 1]);
        r[i] = static_cast<uint32_t>(r0[lane / 4]) | (static_cast<uint32_t>(r1[lane / 4]) << 16);
    }
}

// cp.async.cg 16 bytes global -> shared (zero-filled when !valid). The source is read now; the
// data lands at the cp_async_wait that retires its group (see the header of sim_shim.h).
inline void cp_async_16(void *dst, const void *src, bool valid, const ptsim::Site &s = ptsim::Site::current()) {
    using namespace ptsim;
    sim_detail::check_smem(dst, 16, "cp.async", s);
    if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) {
        raise_fault(FAULT_MISALIGNED, "cp.async at " + where(s) + " by " + thread_name(static_cast<int>(self().tid)) +
                                          ": global source address not 16-byte aligned");
    }
    Pending c;
    c.dst = static_cast<unsigned char *>(dst);
    if (valid)
        std::memcpy(c.data, src, 16);
    else
        std::memset(c.data, 0, 16);
    if (!hazards_enabled()) {
        std::memcpy(dst, c.data, 16);
        return;
    }
    sim_detail::shadow_cp_async(dst, s);
    std::memset(dst, 0xff, 16); // poisoned until the data lands
    c.group = self().open_group;
    c.file = s.file_name();
    c.line = s.line();
    self().pending.push_back(c);
}

// cp.async of a row known to be valid (no zero-fill operand): the same model.
inline void cp_async_16_always(void *dst, const void *src, const ptsim::Site &s = ptsim::Site::current()) {
    cp_async_16(dst, src, true, s);
}

PTSIM_NO_TSAN inline void cp_async_commit() { ++ptsim::self().open_group; }

// Wait until at most N committed groups of this thread are still in flight.
template <int N> inline void cp_async_wait(const ptsim::Site &s = ptsim::Site::current()) {
    const int n = N + ptsim::wait_group_delta(s);
    const uint64_t open = ptsim::self().open_group;
    const uint64_t threshold = open > static_cast<uint64_t>(n) ? open - static_cast<uint64_t>(n) : 0;
    sim_detail::land_groups(threshold, s);
}

// ex2.approx.ftz.f32 (MUFU.EX2: relative error at most 2^-22, "2 ulp"; subnormal inputs and
// results flushed to zero). The host computes exp2f and flushes exactly; with the GPU-numerics
// flavour (PTSIM_GPU_NUMERICS) it also moves the result by a pseudo-random amount within the
// documented error, so tolerances are checked against what a card may compute.
inline float ex2_approx(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
    float r = std::exp2(x);
#ifdef PTSIM_GPU_NUMERICS
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    uint32_t h = bits * 0x9e3779b1u;
    h ^= h >> 15;
    const float rel = (static_cast<float>(h & 0xffffu) / 32768.0f - 1.0f) * 0x1p-22f;
    r = r + r * rel;
#endif
    return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}

PTSIM_NO_TSAN inline float shfl_xor(float v, int lane_mask, const ptsim::Site &s = ptsim::Site::current()) {
    uint32_t mine;
    std::memcpy(&mine, &v, 4);
    uint32_t(*w)[8] = sim_detail::exchange(&mine, 1, "shfl.sync.bfly", 0xffffffffu, s);
    const uint32_t theirs = w[ptsim::self().lane ^ static_cast<unsigned>(lane_mask)][0];
    float r;
    std::memcpy(&r, &theirs, 4);
    return r;
}

// __shfl_xor_sync with an explicit member mask (checked: the whole warp only).
PTSIM_NO_TSAN inline float shfl_xor_sync(uint32_t mask, float v, int lane_mask, const ptsim::Site &s = ptsim::Site::current()) {
    uint32_t mine;
    std::memcpy(&mine, &v, 4);
    uint32_t(*w)[8] = sim_detail::exchange(&mine, 1, "shfl.sync.bfly", mask, s);
    const uint32_t theirs = w[ptsim::self().lane ^ static_cast<unsigned>(lane_mask)][0];
    float r;
    std::memcpy(&r, &theirs, 4);
    return r;
}

inline void sync_block(const ptsim::Site &s = ptsim::Site::current()) { ptsim::block_barrier(s); }

} // namespace pt

// The raw intrinsics some kernels use (common.cuh), on the checked operations.
#define __syncthreads() pt::sync_block()
#define __shfl_xor_sync(mask, v, offset) pt::shfl_xor_sync((mask), (v), (offset))
