// The tile passes (tile_passes_impl.h) for x86-64 CPUs with AVX2 and FMA. The target is set by a
// pragma after every include rather than by a compiler flag, so that no inline function of the
// standard library or of tile_math.h is compiled for AVX2 here (the linker could otherwise keep
// that copy for the baseline code too); tile_pass_table() calls this only on a CPU that has both.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/tile_passes.h"
#include "tile_math.h"

#if ICL_MSR_HAVE_AVX2_PASSES
#pragma GCC target("avx2,fma")
#define ICL_MSR_ISA avx2
#include "cpu/tile_passes_impl.h"
#endif
