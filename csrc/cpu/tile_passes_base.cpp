// The tile passes (tile_passes_impl.h) for the architecture's baseline, and the choice, made once
// per process, between them and the AVX2 ones (tile_passes.h).
#include <c10/util/Exception.h>

#include <cstdlib>
#include <exception>
#include <string>

#include "cpu/tile_passes.h"

#define ICL_MSR_ISA baseline
#include "cpu/tile_passes_impl.h"
#undef ICL_MSR_ISA

namespace icl_msr::cpu {
namespace {

bool cpu_has_avx2_fma() {
#if ICL_MSR_HAVE_AVX2_PASSES
  __builtin_cpu_init();  // a no-op once libgcc's constructor has run; needed before it
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

TilePassTable choose_tile_passes() {
  const char* env = std::getenv("ICL_MSR_CPU_ISA");
  const std::string wanted = env == nullptr ? "" : env;
  TORCH_CHECK(wanted.empty() || wanted == "auto" || wanted == "baseline" || wanted == "avx2",
              "ICL_MSR_CPU_ISA must be unset, \"auto\", \"baseline\" or \"avx2\", got \"", wanted,
              "\"");
  if (wanted == "baseline") return baseline::tile_pass_table();
  const bool avx2 = cpu_has_avx2_fma();
  TORCH_CHECK(wanted != "avx2" || avx2,
              "ICL_MSR_CPU_ISA=avx2, but ",
              ICL_MSR_HAVE_AVX2_PASSES ? "this CPU lacks AVX2 or FMA"
                                       : "this build has no AVX2 tile passes");
#if ICL_MSR_HAVE_AVX2_PASSES
  if (avx2) return avx2::tile_pass_table();
#endif
  return baseline::tile_pass_table();
}

}  // namespace

const TilePassTable& tile_pass_table() {
  static const TilePassTable table = choose_tile_passes();
  return table;
}

}  // namespace icl_msr::cpu

#if defined(_WIN32)
#define ICL_MSR_EXPORT __declspec(dllexport)
#else
#define ICL_MSR_EXPORT __attribute__((visibility("default")))
#endif

// The instruction set of the tile passes in use ("avx2" or "baseline"; "invalid" when
// ICL_MSR_CPU_ISA is), for the tests: read through ctypes, as it is no op of the library.
extern "C" ICL_MSR_EXPORT const char* icl_msr_cpu_isa() {
  try {
    return icl_msr::cpu::tile_pass_table().isa;
  } catch (const std::exception&) {
    return "invalid";
  }
}
