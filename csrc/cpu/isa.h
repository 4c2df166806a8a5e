// The instruction set of the CPU spike_conv2d kernels' inner loops (the
// event-driven accumulation and the weight-gradient sums): the widest this
// build has and this CPU runs, capped by the environment variable
// SPIKINGIR_CPU_ISA ("avx2" or "generic"; for tests and benchmarks: every ISA
// gives the same result bit for bit, since each output value is the same
// sequence of float additions in one vector lane or another). Read at each call.
// spikingir._C.cpu_isa() reports it (`spikingir --version`).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace spikingir {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa accumulate_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  Isa best = __builtin_cpu_supports("avx512f") ? Isa::kAvx512
             : __builtin_cpu_supports("avx2")  ? Isa::kAvx2
                                               : Isa::kGeneric;
  const char* cap = std::getenv("SPIKINGIR_CPU_ISA");
  if (cap && std::strcmp(cap, "avx2") == 0) best = std::min(best, Isa::kAvx2);
  if (cap && std::strcmp(cap, "generic") == 0) best = Isa::kGeneric;
  return best;
#else
  return Isa::kGeneric;
#endif
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic";
}

}  // namespace spikingir
