// Host emulation of the warp operations in warp_ops.cuh, following the PTX ISA fragment layouts
// exactly (see the table there). Each collective operation: every lane publishes its operands in
// the warp's exchange slot, the warp meets at a barrier, then each lane computes its own results
// from the published values. Slots alternate between two buffers so that one barrier per
// operation is enough (a lane can only overwrite a slot after every lane passed the barrier of
// the operation in between, i.e. finished reading it).
#pragma once

#include "cuda_host_shim.h"

namespace pt {

namespace emu_detail {

inline float half_bits_to_float(uint32_t bits16) {
    __half_raw raw;
    raw.x = static_cast<unsigned short>(bits16 & 0xffffu);
    return __half2float(__half(raw));
}

// Publishes `n` words of this lane, synchronises the warp, returns the slot set to read.
inline uint32_t (*exchange(const uint32_t *mine, int n))[8] {
    auto &st = pt_emu::tls;
    const unsigned ph = st.phase;
    st.phase ^= 1u;
    for (int i = 0; i < n; ++i) st.warp->words[ph][st.lane][i] = mine[i];
    st.warp->bar.wait();
    return st.warp->words[ph];
}

inline const void *const *exchange_addr(const void *mine) {
    auto &st = pt_emu::tls;
    const unsigned ph = st.phase;
    st.phase ^= 1u;
    st.warp->addrs[ph][st.lane] = mine;
    st.warp->bar.wait();
    return st.warp->addrs[ph];
}

// Counts the bank conflicts of one ldmatrix.x4 (checked by lane 0 for the warp): the 8 row
// addresses of each matrix must fall in 8 distinct 16-byte bank groups of shared memory.
inline void count_bank_conflicts(const void *const *addrs) {
    if (pt_emu::tls.lane != 0) return;
    const auto *base = pt_emu::tls.block->smem;
    for (unsigned i = 0; i < 4; ++i) {
        unsigned seen = 0;
        for (unsigned r = 0; r < 8; ++r) {
            const auto off = static_cast<size_t>(static_cast<const unsigned char *>(addrs[8 * i + r]) - base);
            const unsigned group = 1u << ((off / 16) % 8);
            if (seen & group) {
                pt_emu::ldmatrix_bank_conflicts.fetch_add(1, std::memory_order_relaxed);
                break;
            }
            seen |= group;
        }
    }
}

} // namespace emu_detail

// D = A B + C for m16n8k16: products of fp16 values are exact in float; the 16 products of one
// output are summed in double and added to C once (tensor cores keep at least fp32 precision).
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    uint32_t(*w)[8] = emu_detail::exchange(mine, 6);
    const unsigned lane = pt_emu::tls.lane, g = lane >> 2, t = lane & 3;
    auto A = [&](unsigned row, unsigned k) {
        const uint32_t word = w[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)];
        return emu_detail::half_bits_to_float(word >> (16 * (k & 1)));
    };
    auto B = [&](unsigned k, unsigned n) {
        const uint32_t word = w[n * 4 + ((k & 7) >> 1)][4 + (k >> 3)];
        return emu_detail::half_bits_to_float(word >> (16 * (k & 1)));
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
inline void ldmatrix_x4(uint32_t r[4], const void *row) {
    pt_emu::check_smem(row, 16, "ldmatrix row address not 16-byte aligned or outside shared memory");
    const void *const *addrs = emu_detail::exchange_addr(row);
    emu_detail::count_bank_conflicts(addrs);
    const unsigned lane = pt_emu::tls.lane;
    for (unsigned i = 0; i < 4; ++i) {
        const uint16_t *src = static_cast<const uint16_t *>(addrs[8 * i + lane / 4]);
        r[i] = static_cast<uint32_t>(src[2 * (lane % 4)]) |
               (static_cast<uint32_t>(src[2 * (lane % 4) + 1]) << 16);
    }
}

// .trans: lane l receives elements (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4) of matrix i.
inline void ldmatrix_x4_trans(uint32_t r[4], const void *row) {
    pt_emu::check_smem(row, 16, "ldmatrix.trans row address not 16-byte aligned or outside shared memory");
    const void *const *addrs = emu_detail::exchange_addr(row);
    emu_detail::count_bank_conflicts(addrs);
    const unsigned lane = pt_emu::tls.lane;
    for (unsigned i = 0; i < 4; ++i) {
        const uint16_t *r0 = static_cast<const uint16_t *>(addrs[8 * i + 2 * (lane % 4)]);
        const uint16_t *r1 = static_cast<const uint16_t *>(addrs[8 * i + 2 * (lane % 4) + 1]);
        r[i] = static_cast<uint32_t>(r0[lane / 4]) | (static_cast<uint32_t>(r1[lane / 4]) << 16);
    }
}

// cp.async completes at once on the host (a valid schedule of the asynchronous copy: kernels
// must never read a buffer before its wait + barrier, nor refill one still being read).
inline void cp_async_16(void *dst, const void *src, bool valid) {
    pt_emu::check_smem(dst, 16, "cp.async destination not 16-byte aligned or outside shared memory");
    if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)
        pt_emu::fail("cp.async global source not 16-byte aligned", src);
    if (valid)
        std::memcpy(dst, src, 16);
    else
        std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}

inline float shfl_xor(float v, int lane_mask) {
    uint32_t mine;
    std::memcpy(&mine, &v, 4);
    uint32_t(*w)[8] = emu_detail::exchange(&mine, 1);
    const uint32_t theirs = w[pt_emu::tls.lane ^ static_cast<unsigned>(lane_mask)][0];
    float r;
    std::memcpy(&r, &theirs, 4);
    return r;
}

inline void sync_block() { pt_emu::tls.block->bar.wait(); }

} // namespace pt
