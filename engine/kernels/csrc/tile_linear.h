// bfloat16 weights in the pair layout (packed_linear.cpp, bf16_pairs.h) multiplied on AMX
// tiles. Defines TANDEM_AMX where the compiler targets a CPU with AMX_TILE and AMX_BF16.
//
// The pair layout is what TDPBF16PS takes as its B tile: 16 pairs of K (tile rows) by 16
// columns of bfloat16 pairs (64 bytes), so a panel is read in place, 1 KB a tile. Rows of
// x go in 16 at a time as the A tile (16 rows by 32 bfloat16), the last M % 16 on tiles
// configured with that many rows, so x is read in place, unpadded; C is those rows of the
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

// tmm0 = C [16 x 16 float32], tmm1 = A [16 rows x 32 bfloat16], tmm2 = B [16 pairs x 16 x 2]
// for whole blocks of 16 rows of x; tmm3, tmm4 = C and A of the last `rest_rows` rows
// (0-15), tmm5 = B again. The configuration is per thread; _tile_release() gives it back.
inline void load_tile_config(int64_t rest_rows) {
  TileConfig config;
  for (int t = 0; t < 6; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  config.rows[3] = config.rows[4] = static_cast<uint8_t>(rest_rows);
  if (rest_rows == 0) {  // unconfigured tiles have no rows and no bytes
    for (int t = 3; t < 6; ++t) config.bytes_per_row[t] = config.rows[t] = 0;
  }
  _tile_loadconfig(&config);
}

// out [M, 16] = x [M, K] . panel [K2 = K / 2, 16, 2], x in bfloat16 rows of K (a multiple
// of 32) read in place, the last M % 16 rows on their own tiles; after
// load_tile_config(M % 16).
inline void tile_rows_of_panel(const at::BFloat16* x, int64_t M, int64_t K,
                               const at::BFloat16* panel, int64_t K2, float* out) {
  const int64_t x_stride = K * sizeof(at::BFloat16), panel_stride = 2 * kPanel * sizeof(at::BFloat16);
  int64_t row = 0;
  for (; row + 16 <= M; row += 16) {
    _tile_zero(0);
    for (int64_t k = 0; k < K2; k += 16) {  // 32 values of K a step
      _tile_loadd(1, x + row * K + 2 * k, x_stride);
      _tile_loadd(2, panel + k * 2 * kPanel, panel_stride);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, out + row * kPanel, kPanel * sizeof(float));
  }
  if (row == M) return;
  _tile_zero(3);
  for (int64_t k = 0; k < K2; k += 16) {
    _tile_loadd(4, x + row * K + 2 * k, x_stride);
    _tile_loadd(5, panel + k * 2 * kPanel, panel_stride);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(3, out + row * kPanel, kPanel * sizeof(float));
}

}  // namespace tandem

#endif
