// Tile shapes of the prefix-attention kernels, named per head dim (like FlashAttention-2's kernel
// traits). The numbers are mirrored in abi/attention.h for the launchers; static_asserts below
// keep the two in step.
#pragma once

#include "abi/attention.h"

namespace pt {

// A CTA of kWarps warps; each warp owns 16 rows of the "row" side of the tile (queries in the
// dQ kernel, keys in the dK/dV kernel; 32 query rows in the forward). Shared-memory rows are padded by 8 halves
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

// Forward: 128 query rows per CTA, 4 warps of 32 rows (two m16 slabs, as FlashAttention-2: every
// K/V fragment read from shared memory feeds two HMMA rows).
// - D = 64: 128 x 64 tiles, Q in registers (32 a thread); 245 registers, no spill.
// - D = 128: Q stays in shared memory and is read per tile (in registers it would take 64 next to
//   the output accumulator's 128), as FA2 does; FA2's 64-key tile does not fit 255 registers
//   without spilling with nvcc 13.0 (FA2's own kernel spills there), so 32-key tiles.
// One K and one V buffer, loaded in separate commit groups.
template <int D> struct FwdTraits;
template <> struct FwdTraits<64> : AttnTraits<64, PT_ATTN_FWD_BLOCK_M, PT_ATTN_FWD_BLOCK_N_D64> {
    static constexpr bool kQInRegs = true;
};
template <> struct FwdTraits<128> : AttnTraits<128, PT_ATTN_FWD_BLOCK_M, PT_ATTN_FWD_BLOCK_N_D128> {
    static constexpr bool kQInRegs = false;
};
template <class Tr> struct FwdSmem {
    static constexpr int kMTiles = Tr::kBlockM / (16 * Tr::kWarps); // m16 slabs per warp
    static_assert(kMTiles * 16 * Tr::kWarps == Tr::kBlockM, "whole m16 slabs per warp");
    // Q tile + K tile + V tile.
    static constexpr int kBytes = 2 * (Tr::kBlockM + 2 * Tr::kBlockN) * Tr::kLd;
};

// The deterministic dQ kernel: each warp 16 query rows, K/V tiles double-buffered.
template <int D> struct DqTraits : AttnTraits<D, PT_ATTN_DQ_BLOCK_M, PT_ATTN_DQ_BLOCK_N> {
    using Base = AttnTraits<D, PT_ATTN_DQ_BLOCK_M, PT_ATTN_DQ_BLOCK_N>;
    static_assert(Base::kBlockM == 16 * Base::kWarps, "one m16 row slab per warp");
    // Q, dO tiles + 2 x (K, V) tiles.
    static constexpr int kSmemDq = 2 * (2 * Base::kBlockM + 4 * Base::kBlockN) * Base::kLd;
};

// dK/dV (FlashAttention-2's backward shapes): one CTA of 8 warps per (query head, 128-key block);
// it streams the query steps (BM rows of Q, dO, lse2, delta) that see its keys. Each product has
// its own 2-D warp layout (warps along rows x warps along columns):
//   S = Q K^T, dP = dO V^T   [BM q x BN keys]   kWmS x kWnS
//   dV += P^T dO, dK += dS^T Q [BN keys x D]    kWnK x kWdK   (P and dS through shared memory)
//   dQ = dS K                [BM q x D]         kWmQ x kWdQ   (atomic mode)
// D = 64: BM = 128 (warp tiles 32 x 64, 32 x 32, 32 x 32); D = 128: BM = 64 (32 x 32, 32 x 64,
// 32 x 32). Q is double-buffered, dO single (it is refilled once dV is done with it).
template <int kHeadDim_, int kBlockM_, int kWmS_, int kWmQ_> struct BwdTraitsBase {
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = PT_ATTN_BWD_BLOCK_N;
    static constexpr int kThreads = PT_ATTN_BWD_THREADS;
    static constexpr int kWarps = kThreads / 32;
    static constexpr int kLd = kHeadDim + 8;  // Q/K/V/dO row stride (halves)
    static constexpr int kLdP = kBlockN + 8;  // P/dS row stride (halves)
    static constexpr int kWmS = kWmS_, kWnS = kWarps / kWmS_;
    static constexpr int kWnK = 4, kWdK = kWarps / 4;
    static constexpr int kWmQ = kWmQ_, kWdQ = kWarps / kWmQ_;
    // Warp tiles: m16 slabs (MT) and n8 tiles (NT) of each product.
    static constexpr int kMtS = kBlockM / kWmS / 16, kNtS = kBlockN / kWnS / 8;
    static constexpr int kMtK = kBlockN / kWnK / 16, kNtK = kHeadDim / kWdK / 8;
    static constexpr int kMtQ = kBlockM / kWmQ / 16, kNtQ = kHeadDim / kWdQ / 8;
    static_assert(kMtS * 16 * kWmS == kBlockM && kNtS * 8 * kWnS == kBlockN, "S warp tiles");
    static_assert(kMtK * 16 * kWnK == kBlockN && kNtK * 8 * kWdK == kHeadDim, "dK/dV warp tiles");
    static_assert(kMtQ * 16 * kWmQ == kBlockM && kNtQ * 8 * kWdQ == kHeadDim, "dQ warp tiles");
    static_assert(kNtS % 2 == 0 && kNtK % 2 == 0 && kNtQ % 2 == 0, "n8 tiles in pairs (ldmatrix.x4)");
    static_assert(kBlockN % kBlockM == 0 && PT_ATTN_ROW_PAD % kBlockM == 0, "query steps tile the rows");
    // K, V + 2 x Q + dO (kLd rows) + P, dS (kLdP rows) + 2 x (lse2, delta).
    static constexpr int kSmem = 2 * (2 * kBlockN * kLd + 3 * kBlockM * kLd + 2 * kBlockM * kLdP) +
                                 4 * 2 * 2 * kBlockM;
};
template <int D> struct BwdTraits;
template <> struct BwdTraits<64> : BwdTraitsBase<64, PT_ATTN_BWD_BLOCK_M_D64, 4, 4> {};
template <> struct BwdTraits<128> : BwdTraitsBase<128, PT_ATTN_BWD_BLOCK_M_D128, 2, 2> {};

static_assert(FwdSmem<FwdTraits<64>>::kBytes == PT_ATTN_FWD_SMEM_D64, "abi/attention.h out of step");
static_assert(FwdSmem<FwdTraits<128>>::kBytes == PT_ATTN_FWD_SMEM_D128, "abi/attention.h out of step");
static_assert(DqTraits<64>::kSmemDq == PT_ATTN_DQ_SMEM_D64, "abi/attention.h out of step");
static_assert(DqTraits<128>::kSmemDq == PT_ATTN_DQ_SMEM_D128, "abi/attention.h out of step");
static_assert(BwdTraits<64>::kSmem == PT_ATTN_DKDV_SMEM_D64, "abi/attention.h out of step");
static_assert(BwdTraits<128>::kSmem == PT_ATTN_DKDV_SMEM_D128, "abi/attention.h out of step");

} // namespace pt
