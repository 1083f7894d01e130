// Kernel tables of the simulator's host build. sim/cuda/build.rs generates, for every
// kernels/<family>.cu, a translation unit that includes the shim, this header and the .cu, then
// lists the file's kernels (found in its preprocessed text) with PTSIM_KERNEL: the parameter list
// (sizes, alignments, kinds) comes from the C++ declaration, so a kernel is registered by name
// without anything written by hand.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "sim_abi.h"

namespace ptsim {

template <class T> constexpr uint8_t param_kind() {
    if constexpr (std::is_pointer_v<T>)
        return PTSIM_PARAM_POINTER;
    else if constexpr (std::is_arithmetic_v<T> || std::is_enum_v<T>)
        return PTSIM_PARAM_SCALAR;
    else
        return PTSIM_PARAM_STRUCT;
}

template <class F> struct Signature;

template <class... A> struct Signature<void(A...)> {
    static constexpr uint32_t n = sizeof...(A);
    static constexpr uint32_t sizes[sizeof...(A) + 1] = {static_cast<uint32_t>(sizeof(std::remove_cvref_t<A>))..., 0};
    static constexpr uint32_t aligns[sizeof...(A) + 1] = {static_cast<uint32_t>(alignof(std::remove_cvref_t<A>))..., 0};
    static constexpr uint8_t kinds[sizeof...(A) + 1] = {param_kind<std::remove_cvref_t<A>>()..., 0};

    template <auto F, std::size_t... I> static void call(void *const *args, std::index_sequence<I...>) {
        F(*static_cast<std::remove_cvref_t<A> *>(args[I])...);
    }
    template <auto F> static void tramp(void *const *args) { call<F>(args, std::index_sequence_for<A...>{}); }
};

} // namespace ptsim

#define PTSIM_KERNEL(family, fn, param_names)                                                               \
    ptsim_kernel_desc {                                                                                    \
        #fn, family, &ptsim::Signature<std::remove_pointer_t<decltype(&fn)>>::template tramp<&fn>,            \
            ptsim::Signature<std::remove_pointer_t<decltype(&fn)>>::n,                                       \
            ptsim::Signature<std::remove_pointer_t<decltype(&fn)>>::sizes,                                   \
            ptsim::Signature<std::remove_pointer_t<decltype(&fn)>>::aligns,                                  \
            ptsim::Signature<std::remove_pointer_t<decltype(&fn)>>::kinds, param_names                       \
    }
