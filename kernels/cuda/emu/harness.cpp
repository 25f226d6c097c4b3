// The kernel sources, compiled for the host against cuda_emu.h, with one C entry point per kernel
// that runs it on host memory (kernels/tests/emulated.rs loads this as a shared library).
#include "cuda_emu.h"

#include "../prelude.cuh"
#include "../quant.cu"
#include "../fp8_gemm.cu"
#include "../ops.cu"
#include "../dispatch.cu"
#include "../model.cu"

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT void emu_quantize_tiles(const float* x, u8* codes, float* scales, int rows, int cols, int fmt, int pow2, int* bad, unsigned grid) {
  emu::launch_seq(dim3{grid, 1, 1}, dim3{256, 1, 1}, [&] { quantize_tiles(x, codes, scales, rows, cols, fmt, pow2, bad); });
}
EXPORT void emu_quantize_tiles_transposed(const float* x, u8* codes, float* scales, int rows, int cols, int fmt, int pow2, int* bad) {
  const dim3 g{(unsigned)((cols + 31) / 32), (unsigned)((rows + 127) / 128), 1};
  emu::launch_seq(g, dim3{256, 1, 1}, [&] { quantize_tiles_transposed(x, codes, scales, rows, cols, fmt, pow2, bad); });
}
EXPORT void emu_quantize_blocks(const float* x, u8* codes, float* scales, int rows, int cols, int fmt, int pow2, int* bad) {
  const dim3 g{(unsigned)((cols + 127) / 128), (unsigned)((rows + 127) / 128), 1};
  emu::launch_seq(g, dim3{256, 1, 1}, [&] { quantize_blocks(x, codes, scales, rows, cols, fmt, pow2, bad); });
}
EXPORT void emu_dequantize(const u8* codes, const float* scales, float* out, int rows, int cols, int fmt, int per) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{128, 1, 1}, [&] { dequantize(codes, scales, out, rows, cols, fmt, per); });
}
EXPORT void emu_transpose_u8(const u8* in, u8* out, int rows, int cols) {
  const dim3 g{(unsigned)((cols + 31) / 32), (unsigned)((rows + 31) / 32), 1};
  emu::launch_seq(g, dim3{32, 8, 1}, [&] { transpose_u8(in, out, rows, cols); });
}
EXPORT void emu_transpose_f32(const float* in, float* out, int rows, int cols) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { transpose_f32(in, out, rows, cols); });
}
EXPORT void emu_pad_rows_f32(const float* in, float* out, int rows, int cols, int ld) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { pad_rows_f32(in, out, rows, cols, ld); });
}
EXPORT void emu_fp8_gemm_grouped(const u8* A, const float* sa, const u8* B, const float* sb, float* C, const int* seg_end,
                                 const int* tile_group, const int* tile_row0, int tiles, int n, int k, int b_scale_rows) {
  const dim3 g{(unsigned)((n + 127) / 128), (unsigned)tiles, 1};
  emu::launch_seq(g, dim3{256, 1, 1}, [&] { fp8_gemm_grouped(A, sa, B, sb, C, seg_end, tile_group, tile_row0, n, k, b_scale_rows); });
}
EXPORT void emu_fp8_gemm_wgmma(const u8* A, const float* sa, const u8* B, const float* sb, float* C, const int* seg_end,
                               const int* tile_group, const int* tile_row0, int tiles, int n, int k, int b_scale_rows) {
  const dim3 g{(unsigned)((n + 127) / 128), (unsigned)tiles, 1};
  emu::launch_seq(g, dim3{256, 1, 1}, [&] { fp8_gemm_wgmma(A, sa, B, sb, C, seg_end, tile_group, tile_row0, n, k, b_scale_rows); });
}
EXPORT void emu_rmsnorm_forward(const float* x, const float* w, float* y, int rows, int d, double eps) {
  emu::launch_seq(dim3{(unsigned)rows, 1, 1}, dim3{64, 1, 1}, [&] { rmsnorm_forward(x, w, y, rows, d, eps); });
}
EXPORT void emu_rmsnorm_backward_input(const float* x, const float* w, const float* dy, float* dx, int rows, int d, double eps) {
  emu::launch_seq(dim3{(unsigned)rows, 1, 1}, dim3{64, 1, 1}, [&] { rmsnorm_backward_input(x, w, dy, dx, rows, d, eps); });
}
EXPORT void emu_swiglu_backward(const float* g, const float* u, const float* dy, float* dg, float* du, long long n) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { swiglu_backward(g, u, dy, dg, du, n); });
}
EXPORT void emu_rope(const float* x, float* y, const float* c, const float* s, long long tokens, int seq, int heads, int dim, int offset, float sign, int interleaved) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { rope(x, y, c, s, tokens, seq, heads, dim, offset, sign, interleaved); });
}
EXPORT void emu_cross_entropy_forward(const float* logits, const unsigned* targets, double* lse, double* loss, int rows, int vocab, long long ignore, int* bad) {
  emu::launch_seq(dim3{(unsigned)rows, 1, 1}, dim3{96, 1, 1}, [&] { cross_entropy_forward(logits, targets, lse, loss, rows, vocab, ignore, bad); });
}
EXPORT void emu_cross_entropy_backward(const float* logits, const unsigned* targets, const double* lse, float* d, int rows, int vocab, long long ignore, float scale) {
  emu::launch_seq(dim3{(unsigned)rows, 1, 1}, dim3{64, 1, 1}, [&] { cross_entropy_backward(logits, targets, lse, d, rows, vocab, ignore, scale); });
}
EXPORT void emu_adamw_bf16(float* p, const float* g, u16* m, u16* v, long long n, const AdamCoeffs* k) {
  const AdamCoeffs kk = *k;
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { adamw_bf16(p, g, m, v, n, kk); });
}
EXPORT void emu_adamw_f32(float* p, const float* g, float* m, float* v, long long n, const AdamCoeffs* k) {
  const AdamCoeffs kk = *k;
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { adamw_f32(p, g, m, v, n, kk); });
}
// `split` > 0: ranks [0, split) and [split, nranks) as two launches running at once (as on two
// GPUs), the second with rank_base = split and its own blockIdx.y from 0.
EXPORT void emu_two_hop(const TwoHopRank* ranks, int nranks, int local, int len0, int len1, int maxd, int slots, int slot_bytes,
                        long long ring_bytes, int combine, long long spin_limit, int* error, int sms, int receivers, int split) {
  emu::launch_all(dim3{(unsigned)sms, (unsigned)nranks, 1}, dim3{(unsigned)(32 * (2 + receivers)), 1, 1}, [&] {
    int base = 0;
    if (split > 0 && (int)emu::bid.y >= split) {
      base = split;
      emu::bid.y -= split;
    }
    two_hop(ranks, base, nranks, local, len0, len1, maxd, slots, slot_bytes, ring_bytes, combine, spin_limit, error);
  });
}
// One launch per rank, as ranks in separate processes run them: rank r's blocks read the table
// `tables + r * nranks`, in which the other ranks carry only their rings.
EXPORT void emu_two_hop_private(const TwoHopRank* tables, int nranks, int local, int len0, int len1, int maxd, int slots,
                                int slot_bytes, long long ring_bytes, int combine, long long spin_limit, int* error, int sms,
                                int receivers) {
  emu::launch_all(dim3{(unsigned)sms, (unsigned)nranks, 1}, dim3{(unsigned)(32 * (2 + receivers)), 1, 1}, [&] {
    const int r = (int)emu::bid.y;
    emu::bid.y = 0;
    two_hop(tables + (long long)r * nranks, r, nranks, local, len0, len1, maxd, slots, slot_bytes, ring_bytes, combine,
            spin_limit, error);
  });
}
EXPORT void emu_combine_reduce(const u16* staged, const int* dest, float* out, int rows, int maxd, int hidden) {
  emu::launch_seq(dim3{(unsigned)rows, 1, 1}, dim3{32, 1, 1}, [&] { combine_reduce(staged, dest, out, rows, maxd, hidden); });
}

// ---- model.cu: warp-per-row kernels run 8 warps per block ----
static dim3 warps_grid(long long rows) { return dim3{(unsigned)((rows + 7) / 8), 1, 1}; }
// The attention kernels' blocks: 8 rows of one (batch, head) each.
static dim3 attention_grid(int batch, int heads, int seq) {
  return dim3{(unsigned)((long long)batch * heads * ((seq + 7) / 8)), 1, 1};
}
EXPORT void emu_attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int batch, int seq,
                                  int heads, int dk, int dv, float scale) {
  emu::launch_seq(attention_grid(batch, heads, seq), dim3{256, 1, 1},
                  [&] { attention_forward(q, k, v, out, lse, batch, seq, heads, dk, dv, scale); });
}
EXPORT void emu_attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                                   const float* lse, float* delta, float* dq, float* dk_, float* dv_, int batch, int seq,
                                   int heads, int dk, int dv, float scale) {
  const dim3 g = warps_grid((long long)batch * heads * seq);
  emu::launch_seq(g, dim3{256, 1, 1}, [&] { attention_delta(dout, out, delta, batch, seq, heads, dv); });
  const dim3 a = attention_grid(batch, heads, seq);
  emu::launch_seq(a, dim3{256, 1, 1},
                  [&] { attention_backward_q(dout, q, k, v, lse, delta, dq, batch, seq, heads, dk, dv, scale); });
  emu::launch_seq(a, dim3{256, 1, 1},
                  [&] { attention_backward_kv(dout, q, k, v, lse, delta, dk_, dv_, batch, seq, heads, dk, dv, scale); });
}
EXPORT void emu_rmsnorm_backward_weight(const float* x, const float* dy, float* rstd, float* dw, int rows, int d, double eps) {
  emu::launch_seq(warps_grid(rows), dim3{256, 1, 1}, [&] { row_rstd(x, rstd, rows, d, eps); });
  emu::launch_seq(dim3{(unsigned)((d + 63) / 64), 1, 1}, dim3{64, 1, 1}, [&] { rmsnorm_backward_weight(x, dy, rstd, dw, rows, d); });
}
EXPORT void emu_embedding_gather(const float* table, const unsigned* ids, float* out, long long n, int d) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { embedding_gather(table, ids, out, n, d); });
}
EXPORT void emu_embedding_scatter(const float* dy, const unsigned* uniq, const unsigned* off, const unsigned* rows, float* dtable,
                                  int n_uniq, int d) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { embedding_scatter(dy, uniq, off, rows, dtable, n_uniq, d); });
}
EXPORT void emu_copy_cols(const float* src, float* dst, int rows, int groups, int width, int src_ld, int src_off, int src_gs,
                          int dst_ld, int dst_off, int dst_gs, int accumulate) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1},
                  [&] { copy_cols(src, dst, rows, groups, width, src_ld, src_off, src_gs, dst_ld, dst_off, dst_gs, accumulate); });
}
EXPORT void emu_gather_rows(const float* src, const unsigned* idx, const float* scale, float* dst, long long n, int width) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { gather_rows(src, idx, scale, dst, n, width); });
}
EXPORT void emu_scatter_add_rows(const float* src, const unsigned* idx, const float* scale, float* dst, long long n, int width) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { scatter_add_rows(src, idx, scale, dst, n, width); });
}
EXPORT void emu_row_dots(const float* a, const unsigned* idx, const float* b, float* out, int n, int width) {
  emu::launch_seq(warps_grid(n), dim3{256, 1, 1}, [&] { row_dots(a, idx, b, out, n, width); });
}
EXPORT void emu_add_into(float* y, const float* x, long long n) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { add_into(y, x, n); });
}
EXPORT void emu_to_bf16(const float* x, unsigned short* y, long long n) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { to_bf16(x, y, n); });
}
EXPORT void emu_round_bf16(float* x, long long n) {
  emu::launch_seq(dim3{2, 1, 1}, dim3{64, 1, 1}, [&] { round_bf16(x, n); });
}
EXPORT void emu_sum_sq_partial(const float* x, double* partial, long long n, unsigned blocks) {
  emu::launch_seq(dim3{blocks, 1, 1}, dim3{256, 1, 1}, [&] { sum_sq_partial(x, partial, n); });
}
