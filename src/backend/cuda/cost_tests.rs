//! The kernels' costs (`kernel!` beside each launcher) against counts by hand on a few
//! shapes: bytes every input read once and every output written once, flops per element.

use super::{attention, dense, encoder, optim, sparse, topk, transformer};
use crate::perf::{Category, KernelCost, Work};

fn cost(k: &KernelCost, args: &[u64]) -> (f64, f64) {
    let w: Work = (k.eval)(args);
    (w.bytes, w.flops)
}

#[test]
fn elementwise_costs_by_hand() {
    // axpy over 1000 floats: x read (4000), y read and written (8000); a multiply and an add.
    assert_eq!(cost(&dense::AXPY, &[1000]), (12_000.0, 2_000.0));
    // y (3 x 5) read and written, bias (5) read: 2 * 60 + 20 bytes, 15 adds.
    assert_eq!(cost(&dense::ADD_BIAS, &[3, 5]), (140.0, 15.0));
    // A cast of 7 elements: 28 bytes of f32 and 14 of bf16.
    assert_eq!(cost(&dense::CAST_TO_BF16, &[7]), (42.0, 7.0));
    // The checked cast and copy add the health block's three words (24 bytes); the copy
    // writes f32 (56 bytes for 7 elements).
    assert_eq!(cost(&dense::CAST_TO_BF16_CHECKED, &[7]), (66.0, 7.0));
    assert_eq!(cost(&dense::COPY_CHECKED, &[7]), (80.0, 7.0));
    // C = beta C over 6 elements: written only (beta = 0: 24), read too otherwise (48).
    assert_eq!(cost(&dense::SCALE_ROWS, &[6, 0]).0, 24.0);
    assert_eq!(cost(&dense::SCALE_ROWS, &[6, 1]).0, 48.0);
    // The SwiGLU backward with its check, over 10 elements: gate, up, dh read and both
    // gradients written (200 bytes) plus the health block's three words; in bf16 over the
    // saves, 2-byte gate and up read and written and dh read (120 bytes) plus the block.
    assert_eq!(cost(&dense::SWIGLU_BACKWARD_CHECKED, &[10]), (224.0, 120.0));
    assert_eq!(cost(&dense::SWIGLU_BACKWARD_BF16_CHECKED, &[10]), (144.0, 120.0));
    // Filling 10 u16: 20 bytes.
    assert_eq!(cost(dense::fill_kernel(2).unwrap(), &[10, 2]), (20.0, 0.0));
    assert!(dense::fill_kernel(3).is_none());
    // RMSNorm of 4 rows of 8: x and y 2 * 128, w 32, inv_rms 16 bytes; with only a bf16 y,
    // y is 64 bytes.
    assert_eq!(cost(&transformer::RMSNORM[0], &[4, 8, 4, 0, 0]).0, 256.0 + 32.0 + 16.0);
    assert_eq!(cost(&transformer::RMSNORM[0], &[4, 8, 2, 0, 0]).0, 128.0 + 64.0 + 32.0 + 16.0);
    // With the residual added (read 128, x written back 128) and x saved (128): 32 adds.
    assert_eq!(cost(&transformer::RMSNORM[0], &[4, 8, 2, 1, 1]), (128.0 + 64.0 + 384.0 + 32.0 + 16.0, 160.0));
    // Its backward: x, dy read and dx written (3 * 128), w 32, inv_rms 16; added into dx,
    // dx is read too (+128); with a bf16 copy, +64.
    assert_eq!(cost(&transformer::RMSNORM_BACKWARD[0], &[4, 8, 0, 0, 0]).0, 384.0 + 32.0 + 16.0);
    assert_eq!(cost(&transformer::RMSNORM_BACKWARD[0], &[4, 8, 1, 2, 0]).0, 384.0 + 128.0 + 64.0 + 32.0 + 16.0);
    // With the gradient in two parts, the second is read too (+128) and added (+32 flops).
    assert_eq!(
        cost(&transformer::RMSNORM_BACKWARD[0], &[4, 8, 1, 2, 1]),
        (384.0 + 128.0 + 64.0 + 128.0 + 32.0 + 16.0, 320.0)
    );
    // RoPE on 3 tokens of 2 heads x 4 dims with a 5-position table (5 x 4 entries: cos and
    // sin of 5 x 2): x read and written 2 * 96, tables 80 bytes; 6 flops per pair (12 pairs).
    assert_eq!(cost(&transformer::ROPE, &[3, 8, 20, 0]), (192.0 + 80.0, 72.0));
    // With bf16 copies of the rotated values: + 2 * 24 bytes.
    assert_eq!(cost(&transformer::ROPE, &[3, 8, 20, 2]), (192.0 + 48.0 + 80.0, 72.0));
    // LayerNorm of 2 rows of 3: x, y 48; w, b 24; mean, rstd 16.
    assert_eq!(cost(&encoder::LAYERNORM, &[2, 3]).0, 88.0);
    // Mean pooling of batch 2, t 4, cols 3: all 4 rows read (96), 2 rows written (24).
    assert_eq!(cost(&encoder::POOL, &[2, 4, 3, 1]).0, 120.0);
    // [CLS] pooling reads one row per sequence.
    assert_eq!(cost(&encoder::POOL, &[2, 4, 3, 0]).0, 48.0);
}

#[test]
fn attention_dkdv_cost_by_hand() {
    // batch 1, seq 4, 2 heads, 1 KV head, head dim 8, causal: q and dout 64 elements each,
    // k, v, dk, dv 32 each, 8 query rows (stats 2, delta 1 each), all f32: 4 * (128 + 128 +
    // 24) bytes; dv's bf16 copy adds 64. Flops: 8 per (pair, head, dim), 10 causal pairs.
    let args = [1, 4, 2, 1, 8, 1];
    assert_eq!(cost(&attention::DKDV_F32, &args), (1_120.0, 8.0 * 2.0 * 10.0 * 8.0));
    assert_eq!(cost(&attention::DKDV_BF16[1], &[1, 4, 2, 1, 8, 1, 1]).0, 1_184.0);
}

#[test]
fn attention_costs_grow_with_the_square_of_the_sequence() {
    // 6 causal score rows of 3 keys (2 matrices of 3 x 3): 18 scores read and written.
    assert_eq!(cost(&transformer::SOFTMAX_CAUSAL[1], &[6, 3]).0, 144.0);
    assert_eq!(transformer::SOFTMAX_CAUSAL[2].category, Category::Attention);
    let (b1, _) = cost(&encoder::SOFTMAX_MASKED, &[2 * 10, 10]);
    let (b2, _) = cost(&encoder::SOFTMAX_MASKED, &[2 * 20, 20]);
    assert_eq!(b2, 4.0 * b1);
}

#[test]
fn sparse_topk_and_optimizer_costs_by_hand() {
    // SparseAdam on 100 entries: the entry (12), both moments (16) read and written, the
    // parameter read and written (8) and the change written (4); the clock's two words.
    // The parameter's bf16 copy adds 2 bytes written per entry.
    assert_eq!(cost(&optim::SPARSE_ADAM, &[100, 100, 100, 0, 0, 1]).0, 4_016.0);
    assert_eq!(cost(&optim::SPARSE_ADAM, &[100, 100, 0, 0, 100, 1]).0, 3_816.0);
    assert_eq!(cost(&optim::SPARSE_ADAM, &[100, 0, 0, 200, 0, 1]).0, 3_016.0);
    assert_eq!(cost(&optim::SPARSE_ADAM, &[100, 0, 0, 0, 0, 1]).0, 2_816.0);
    // Two parameters, 100 and 50 entries, the first with its parameter: two clocks.
    assert_eq!(cost(&optim::SPARSE_ADAM, &[150, 100, 0, 0, 0, 2]).0, 28.0 * 150.0 + 800.0 + 32.0);
    // AdamW on 10 entries: parameter and moments read and written, gradient read (28 each),
    // the clock; with the bf16 copy 2 bytes more each.
    assert_eq!(cost(&optim::ADAMW, &[10, 0, 1]), (296.0, 140.0));
    assert_eq!(cost(&optim::ADAMW, &[10, 10, 1]), (316.0, 140.0));
    // Two parameters in one launch, 4 and 6 entries, the first with its bf16 copy: two
    // clocks.
    assert_eq!(cost(&optim::ADAMW, &[10, 4, 2]), (280.0 + 8.0 + 32.0, 140.0));
    // One top-k histogram pass over 8192 entries: 32 KiB read, 2048 bins written and the
    // previous pass's 2048 bins read.
    assert_eq!(cost(&topk::TOPK_HIST, &[8192, 1]).0, 32_768.0 + 2.0 * 8_192.0);
    // A batch of 3 jobs: 3 sets of bins.
    assert_eq!(cost(&topk::TOPK_HIST, &[8192, 3]).0, 32_768.0 + 6.0 * 8_192.0);
    // The tile count of 8192 entries in 2 tiles: bins, matrix, 2 tile words x 3.
    assert_eq!(cost(&topk::TOPK_TILE_COUNT, &[8192, 1, 2]).0, 8_192.0 + 32_768.0 + 48.0);
    // The scatter of k = 3 entries from 8192: the matrix (32768), 2 tile words (16), 3 x 12.
    assert_eq!(cost(&topk::TOPK_SCATTER, &[8192, 3, 2]).0, 32_768.0 + 16.0 + 36.0);
    // The fill scatter's bound for k = 3: the same reads, 3 x 12 written and 3 values read
    // for the range.
    assert_eq!(cost(&topk::TOPK_SCATTER_FILL, &[8192, 3, 2]).0, 32_768.0 + 16.0 + 48.0);
    // coo_dense_t with 5 entries against 4 rows of b: per entry its COO fields and slot (16),
    // per entry and row a read of b and an atomic read-modify-write of out (12).
    assert_eq!(cost(&sparse::COO_DENSE_T, &[5, 4]), (80.0 + 240.0, 40.0));
    assert_eq!(cost(&sparse::GATHER_ROWS[1], &[3, 10]).0, 12.0 + 60.0);
}

#[test]
fn merged_update_costs_by_hand() {
    // Densifying 5 entries: per entry rows, cols, values (12) and the previous entry's
    // indices (8) read, one element written: f32 5 * 24, bf16 5 * 22; no arithmetic.
    assert_eq!(cost(&sparse::COO_DENSIFY[0], &[5, 4]), (120.0, 0.0));
    assert_eq!(cost(&sparse::COO_DENSIFY[1], &[5, 2]), (110.0, 0.0));
    // Row starts of 5 entries of a 3-row COO: 4 searches of 3 probes (5 has 3 bits) of 4
    // bytes plus the start written (4 * 4 * 4 = 64), each entry's row and column read (40).
    assert_eq!(cost(&sparse::COO_ROW_STARTS, &[5, 3]), (104.0, 0.0));
    // coo_mm of 5 entries, 3 rows, 7 columns of b: starts 16, entries 40, 5 rows of b 140,
    // out 3 x 7 written 84; a multiply and an add per entry and column (70).
    assert_eq!(cost(&sparse::COO_MM, &[5, 3, 7]), (280.0, 70.0));
}
