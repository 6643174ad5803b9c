// bfloat16 weights in the pair layout (packed_linear.cpp, bf16_pairs.h) multiplied on AMX
// tiles. Defines TANDEM_AMX where the compiler targets a CPU with AMX_TILE and AMX_BF16.
//
// The pair layout is what TDPBF16PS takes as its B tile: 16 pairs of K (tile rows) by 16
// columns of bfloat16 pairs (64 bytes), so a panel is read in place, 1 KB a tile. Rows of
// x go in 16 at a time as the A tile (16 rows by 32 bfloat16); C is 16 rows of the
// panel's 16 float32 outputs. The tiles do a 16-row panel step in one instruction, so a
// decode-sized call is bound by streaming the weights once, and rows beyond 16 re-read
// each panel from L1.

#pragma once

#include "bf16_pairs.h"

#if defined(TANDEM_BF16_PAIRS) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TANDEM_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace tandem {

// Linux lends the tile registers only to a process that asks (arch_prctl); once is enough.
inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// tmm0 = C [16 x 16 float32], tmm1 = A [16 rows x 32 bfloat16], tmm2 = B [16 pairs x 16 x 2],
// for this thread (the configuration is per thread; _tile_release() gives it back).
inline void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 3; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// out [16 * row_blocks, 16] = x [16 * row_blocks, K] . panel [K2 = K / 2, 16, 2], x in
// bfloat16 rows of K (a multiple of 32), after load_tile_config().
inline void tile_rows_of_panel(const at::BFloat16* x, int64_t row_blocks, int64_t K,
                               const at::BFloat16* panel, int64_t K2, float* out) {
  for (int64_t block = 0; block < row_blocks; ++block) {
    const at::BFloat16* rows = x + block * 16 * K;
    _tile_zero(0);
    for (int64_t k = 0; k < K2; k += 16) {  // 32 values of K a step
      _tile_loadd(1, rows + 2 * k, K * sizeof(at::BFloat16));
      _tile_loadd(2, panel + k * 2 * kPanel, 2 * kPanel * sizeof(at::BFloat16));
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, out + block * 16 * kPanel, kPanel * sizeof(float));
  }
}

}  // namespace tandem

#endif
