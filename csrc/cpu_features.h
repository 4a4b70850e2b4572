// Run-time CPU feature checks shared by the kernels that have an AVX2 + FMA path.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define LENVM_HAS_X86 1
#define LENVM_AVX2_FMA __attribute__((target("avx2,fma,f16c")))
#else
#define LENVM_HAS_X86 0
#endif

namespace lenvm {

// True when this CPU runs AVX2, FMA and F16C instructions (every AVX2 CPU has the other two; always false off
// x86).
inline bool cpu_has_avx2_fma() {
#if LENVM_HAS_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

}  // namespace lenvm
