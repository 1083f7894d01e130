// Tile shapes of the prefix-attention kernels, named per head dim (like FlashAttention-2's kernel
// traits). The numbers are mirrored in abi/attention.h for the launchers; static_asserts below
// keep the two in step.
#pragma once

#include "abi/attention.h"

namespace pt {

// A CTA of kWarps warps; each warp owns 16 rows of the "row" side of the tile (queries in the
// forward and the dQ kernel, keys in the dK/dV kernel). Shared-memory rows are padded by 8 halves
// (16 B) so the 8 row addresses of one ldmatrix hit distinct bank groups.
template <int kHeadDim_, int kBlockM_, int kBlockN_> struct AttnTraits {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_; // query rows per tile
    static constexpr int kBlockN = kBlockN_; // key rows per tile
    static constexpr int kThreads = PT_ATTN_THREADS;
    static constexpr int kWarps = kThreads / 32;
    static constexpr int kLd = kHeadDim + 8; // smem row stride (halves) of Q/K/V/dO tiles
    static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64");
    static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "tiles are made of m16n8k16 steps");
};

// Forward (and the deterministic dQ kernel): each warp 16 query rows, K/V tiles double-buffered.
template <int D> struct FwdTraits : AttnTraits<D, PT_ATTN_FWD_BLOCK_M, PT_ATTN_FWD_BLOCK_N> {
    using Base = AttnTraits<D, PT_ATTN_FWD_BLOCK_M, PT_ATTN_FWD_BLOCK_N>;
    static_assert(Base::kBlockM == 16 * Base::kWarps, "one m16 row slab per warp");
    // Q tile + 2 x (K, V) tiles.
    static constexpr int kSmemFwd = 2 * (Base::kBlockM + 4 * Base::kBlockN) * Base::kLd;
    // Q, dO tiles + 2 x (K, V) tiles.
    static constexpr int kSmemDq = 2 * (2 * Base::kBlockM + 4 * Base::kBlockN) * Base::kLd;
};

// dK/dV: each warp 16 key rows of the CTA's key block; query tiles (Q, dO, LSE, delta) stream
// through double-buffered shared memory. D = 128 uses 32-row query steps to keep dK, dV, S^T and
// dP^T in registers without spilling.
template <int D> struct BwdTraits;
template <> struct BwdTraits<64> : AttnTraits<64, PT_ATTN_BWD_BLOCK_M_D64, PT_ATTN_BWD_BLOCK_N> {};
template <> struct BwdTraits<128> : AttnTraits<128, PT_ATTN_BWD_BLOCK_M_D128, PT_ATTN_BWD_BLOCK_N> {};

template <class Tr> struct BwdSmem {
    static constexpr int kLdS = Tr::kBlockM + 8; // dS^T tile row stride (halves)
    static constexpr int kBytes = 2 * (2 * Tr::kBlockN * Tr::kLd + 4 * Tr::kBlockM * Tr::kLd +
                                       Tr::kBlockN * kLdS) +
                                  4 * 4 * Tr::kBlockM;
};

static_assert(FwdTraits<64>::kSmemFwd == PT_ATTN_FWD_SMEM_D64, "abi/attention.h out of step");
static_assert(FwdTraits<128>::kSmemFwd == PT_ATTN_FWD_SMEM_D128, "abi/attention.h out of step");
static_assert(FwdTraits<64>::kSmemDq == PT_ATTN_DQ_SMEM_D64, "abi/attention.h out of step");
static_assert(FwdTraits<128>::kSmemDq == PT_ATTN_DQ_SMEM_D128, "abi/attention.h out of step");
static_assert(BwdSmem<BwdTraits<64>>::kBytes == PT_ATTN_DKDV_SMEM_D64, "abi/attention.h out of step");
static_assert(BwdSmem<BwdTraits<128>>::kBytes == PT_ATTN_DKDV_SMEM_D128, "abi/attention.h out of step");
static_assert(BwdTraits<64>::kBlockN == 16 * BwdTraits<64>::kWarps, "one m16 key slab per warp");

} // namespace pt
