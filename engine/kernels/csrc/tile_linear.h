// bfloat16 weights in the pair layout (packed_linear.cpp, bf16_pairs.h) multiplied on AMX
// tiles. Defines TANDEM_AMX where the compiler targets a CPU with AMX_TILE and AMX_BF16.
//
// The pair layout is what TDPBF16PS takes as its B tile: 16 pairs of K (tile rows) by 16
// columns of bfloat16 pairs (64 bytes), so a panel is read in place, 1 KB a tile. Rows of
// x go in 16 at a time as the A tile (16 rows by 32 bfloat16), read in place, unpadded.
//
// A block is 32 rows of x by two panels (32 columns) on four C tiles, so each A and B
// tile loaded serves two products: one load a product, where one C tile at a time took
// two. The loads are what limits: on an Intel Xeon one core did 2.4 TFLOP/s of tile
// products with every operand in registers (one accumulator chain as fast as four),
// 1.7 with this block's loads from L1. Blocks at the end of x with fewer rows, and the
// last panel when the count is odd, run on tiles configured with those rows and skip the
// missing products: x is never padded or copied.
//
// Order: a thread takes a range of panel pairs. For up to kRowsInL2 bytes of x at a time
// (so those rows stay in L2 while the thread's panels go by), it goes panel pair by panel
// pair, and within one down the rows: a decode-sized call streams each panel from memory
// once, and a prefill-sized one reads x from memory once per thread and the weights once
// per group of rows.

#pragma once

#include "bf16_pairs.h"

#if defined(TANDEM_BF16_PAIRS) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TANDEM_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
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

// Tiles: 0, 1 = C of the block's first 16 rows (panel 0, panel 1); 2, 3 = C of the next
// `rows1` rows; 4, 5 = A of those two row groups; 6, 7 = B of the two panels. rows0 is
// 1-16, rows1 0-16 (0: the block has one row group). The configuration is per thread;
// _tile_release() gives it back.
inline void load_tile_config(int rows0, int rows1) {
  TileConfig config;
  const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int t = 0; t < 8; ++t) {  // every row is 64 bytes: 16 float32, 32 bfloat16
    config.rows[t] = static_cast<uint8_t>(rows[t]);
    config.bytes_per_row[t] = rows[t] ? 64 : 0;  // unconfigured tiles have neither
  }
  // GCC does not count LDTILECFG as reading `config` and may drop the stores above
  // (seen with GCC 12: every tile left unconfigured); this keeps them.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// out0, out1 [rows, 16] float32 (rows 16 apart as tiles store them) = x [rows, K] . panel0,
// panel1 [K2, 16, 2]; x's rows K apart. kRows1: the block has a second row group (tiles 2,
// 3, 5); kPanel1: a second panel (tiles 1, 3, 7).
template <bool kRows1, bool kPanel1>
inline void tile_block(const at::BFloat16* x, int64_t K, const at::BFloat16* panel0,
                       const at::BFloat16* panel1, int64_t K2, float* out0, float* out1) {
  const int64_t x_stride = K * sizeof(at::BFloat16);
  constexpr int64_t kPairRow = 2 * kPanel, kPanelStride = kPairRow * sizeof(at::BFloat16);
  constexpr int64_t kOutStride = kPanel * sizeof(float);
  const at::BFloat16* x1 = x + 16 * K;
  _tile_zero(0);
  if constexpr (kPanel1) _tile_zero(1);
  if constexpr (kRows1) _tile_zero(2);
  if constexpr (kRows1 && kPanel1) _tile_zero(3);
  for (int64_t k = 0; k < K2; k += 16) {  // 32 values of K a step
    _tile_loadd(4, x + 2 * k, x_stride);
    _tile_loadd(6, panel0 + k * kPairRow, kPanelStride);
    if constexpr (kRows1) _tile_loadd(5, x1 + 2 * k, x_stride);
    if constexpr (kPanel1) _tile_loadd(7, panel1 + k * kPairRow, kPanelStride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kPanel1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kRows1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (kRows1 && kPanel1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out0, kOutStride);
  if constexpr (kPanel1) _tile_stored(1, out1, kOutStride);
  if constexpr (kRows1) _tile_stored(2, out0 + 16 * kPanel, kOutStride);
  if constexpr (kRows1 && kPanel1) _tile_stored(3, out1 + 16 * kPanel, kOutStride);
}

inline void tile_block(bool rows1, bool panel1, const at::BFloat16* x, int64_t K,
                       const at::BFloat16* panel0, const at::BFloat16* panel1_data, int64_t K2,
                       float* out0, float* out1) {
  if (rows1 && panel1) return tile_block<true, true>(x, K, panel0, panel1_data, K2, out0, out1);
  if (rows1) return tile_block<true, false>(x, K, panel0, panel1_data, K2, out0, out1);
  if (panel1) return tile_block<false, true>(x, K, panel0, panel1_data, K2, out0, out1);
  tile_block<false, false>(x, K, panel0, panel1_data, K2, out0, out1);
}

constexpr int64_t kRowsInL2 = 512 * 1024;  // bytes of x a thread keeps in L2 (2 MB a core)

// Runs `write(row0, rows, p, tile)` for every block of x [M, K] against panels
// [panel_begin, panel_end) of `packed` [P, K2, 16, 2] (panel_begin even), where tile
// [rows, 16] float32 holds rows row0.. of panel p's outputs. Call on the thread that owns
// those panels: it configures the tiles and releases them.
template <typename Write>
void tile_linear_panels(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* packed,
                        int64_t K2, int64_t panel_begin, int64_t panel_end, Write&& write) {
  alignas(64) float out[2][32 * kPanel];
  const int64_t panel_size = K2 * 2 * kPanel;
  const int64_t full = M / 32 * 32, rest = M - full;
  const int64_t group = std::max<int64_t>(32, kRowsInL2 / (K * 2) / 32 * 32);
  auto run_rows = [&](int64_t begin, int64_t end, int64_t rows) {
    for (int64_t p = panel_begin; p < panel_end; p += 2) {
      const bool second = p + 1 < panel_end;
      const at::BFloat16* w0 = packed + p * panel_size;
      for (int64_t row = begin; row < end; row += rows) {
        tile_block(rows > 16, second, x + row * K, K, w0, w0 + panel_size, K2, out[0], out[1]);
        write(row, rows, p, out[0]);
        if (second) write(row, rows, p + 1, out[1]);
      }
    }
  };
  if (full > 0) {
    load_tile_config(16, 16);
    for (int64_t row = 0; row < full; row += group) run_rows(row, std::min(full, row + group), 32);
  }
  if (rest > 0) {
    load_tile_config(static_cast<int>(std::min<int64_t>(rest, 16)),
                     static_cast<int>(std::max<int64_t>(rest - 16, 0)));
    run_rows(full, M, rest);
  }
  _tile_release();
}

// dst[0:16] = bfloat16(src[0:16] (+ bias[0:16])), rounded to nearest even as Tensor.to.
inline void write_bf16_row(const float* src, const float* bias, at::BFloat16* dst) {
  __m512 v = _mm512_loadu_ps(src);
  if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

}  // namespace tandem

#endif
