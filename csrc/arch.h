// Which instruction sets the build may use. On x86-64 with GCC or clang, the AVX2, AVX-512 and AMX code paths are
// compiled with function-level target attributes and picked at run time from the CPU's features, so one build runs
// on every x86-64 CPU. Elsewhere (aarch64, ...) only the portable code is compiled: the SIMD row and column
// primitives fall back to scalar loops, nn_count keeps its baseline micro-tile, and the thin-chunk kernel says it is
// unsupported (its callers then use BLAS chunks). FASTALIGN_PORTABLE_ONLY builds that portable variant on x86-64
// too, which is how tests/test_portable_build.py checks it without an ARM machine.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(FASTALIGN_PORTABLE_ONLY)
#define FASTALIGN_X86_SIMD 1
#endif

#ifdef FASTALIGN_X86_SIMD
#include <cstdlib>
#include <cstring>

// FASTALIGN_CPU_ISA caps the instruction sets the run-time dispatch picks, read when the extension loads: "avx2" runs a
// CPU with AVX-512 as one without it (no AVX-512, no AMX: an AMD Zen 3, say), "avx512" as one without AMX; unset (or
// "native") picks the widest the CPU has. fastalign/_ext.py refuses other values before loading. A cap, not a wish:
// it never turns on what the CPU lacks.
inline int cpu_isa_cap() {  // 2: AVX2, 3: AVX-512, 4: no cap
  const char* v = std::getenv("FASTALIGN_CPU_ISA");
  if (v == nullptr) return 4;
  if (std::strcmp(v, "avx2") == 0) return 2;
  if (std::strcmp(v, "avx512") == 0) return 3;
  return 4;
}
#endif
