//! The constants the launchers share with the kernels, read at compile time from the kernel
//! sources themselves (their `#define` lines), so nvcc, the emulator build and Rust use one
//! source: threads per block, compaction tile sizes, the device error bits, the top-k
//! histogram size, the chunk of coo_dense_t and the attention kernels' tiles.

const COMMON_CUH: &str = include_str!("../../../cuda/common.cuh");
const TOPK_CU: &str = include_str!("../../../cuda/topk.cu");
const SPARSE_CU: &str = include_str!("../../../cuda/sparse.cu");
const OPTIM_CU: &str = include_str!("../../../cuda/optim.cu");
const ATTENTION_CUH: &str = include_str!("../../../cuda/attention.cuh");

const fn define(name: &str) -> u64 {
    define_in(COMMON_CUH, name)
}

/// The value of `#define NAME <digits>[u]` in `source`; a compile error if there is no
/// such line.
const fn define_in(source: &str, name: &str) -> u64 {
    let text = source.as_bytes();
    let name = name.as_bytes();
    let prefix = b"#define ";
    let mut i = 0;
    while i + prefix.len() + name.len() < text.len() {
        let line_start = i == 0 || text[i - 1] == b'\n';
        if line_start && starts_with(text, i, prefix) && starts_with(text, i + prefix.len(), name) {
            let mut j = i + prefix.len() + name.len();
            if text[j] == b' ' {
                while text[j] == b' ' {
                    j += 1;
                }
                let mut value: u64 = 0;
                let mut digits = 0;
                while j < text.len() && text[j].is_ascii_digit() {
                    value = value * 10 + (text[j] - b'0') as u64;
                    j += 1;
                    digits += 1;
                }
                if digits > 0 {
                    return value;
                }
            }
        }
        i += 1;
    }
    panic!("a kernel source lacks the numeric #define of a constant the CUDA launchers need")
}

const fn starts_with(text: &[u8], at: usize, what: &[u8]) -> bool {
    if at + what.len() > text.len() {
        return false;
    }
    let mut k = 0;
    while k < what.len() {
        if text[at + k] != what[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// Threads per block of the 1-D kernels (`SG_THREADS`).
pub(super) const THREADS: u32 = define("SG_THREADS") as u32;
/// Elements per compaction tile (`SG_TILE` = `SG_THREADS * SG_TILE_ITEMS`).
pub(super) const TILE: usize = (define("SG_THREADS") * define("SG_TILE_ITEMS")) as usize;

/// Histogram bins per top-k radix pass (`TOPK_BINS` in cuda/topk.cu).
pub(super) const TOPK_BINS: usize = define_in(TOPK_CU, "TOPK_BINS") as usize;
/// u64 words of the top-k state block (`TOPK_STATE_WORDS` in cuda/topk.cu).
pub(super) const TOPK_STATE_WORDS: usize = define_in(TOPK_CU, "TOPK_STATE_WORDS") as usize;
/// Top-k selections per launch (`TOPK_MAX_JOBS` in cuda/topk.cu).
pub(super) const TOPK_MAX_JOBS: usize = define_in(TOPK_CU, "TOPK_MAX_JOBS") as usize;
/// Parameters per AdamW launch (`ADAMW_MAX_JOBS` in cuda/optim.cu).
pub(super) const ADAMW_MAX_JOBS: usize = define_in(OPTIM_CU, "ADAMW_MAX_JOBS") as usize;
/// Parameters per SparseAdam launch (`SPARSE_ADAM_MAX_JOBS` in cuda/optim.cu).
pub(super) const SPARSE_ADAM_MAX_JOBS: usize = define_in(OPTIM_CU, "SPARSE_ADAM_MAX_JOBS") as usize;
/// COO entries staged per block of coo_dense_t_f32 (`SG_CDT_CHUNK` in cuda/sparse.cu).
pub(super) const CDT_CHUNK: usize = (define("SG_THREADS") * define_in(SPARSE_CU, "SG_CDT_PER_THREAD")) as usize;

/// Largest head dimension of the attention kernels (`SG_ATT_DMAX` in cuda/attention.cuh).
pub(super) const ATT_DMAX: usize = define_in(ATTENTION_CUH, "SG_ATT_DMAX") as usize;
/// Queries (forward, dq) or keys (dkdv) per block of the f32 attention kernels.
pub(super) const ATT_F32_ROWS: usize = define_in(ATTENTION_CUH, "SG_ATT_F32_ROWS") as usize;
/// Queries per block of the bf16 attention forward.
pub(super) const ATT_BF16_FWD_ROWS: usize = define_in(ATTENTION_CUH, "SG_ATT_BF16_FWD_ROWS") as usize;
/// Keys (dkdv) or queries (dq) per block of the bf16 attention backward.
pub(super) const ATT_BF16_TILE: usize = define_in(ATTENTION_CUH, "SG_ATT_BF16_TILE") as usize;

/// Bits of the device error word (`SG_ERR_*`) and the op each one names.
pub(super) const ERR_BITS: [(u32, &str); 10] = [
    (define("SG_ERR_GATHER_ROWS") as u32, "gather_rows"),
    (define("SG_ERR_GATHER_BLOCK") as u32, "gather_block"),
    (define("SG_ERR_COO_SCATTER") as u32, "coo_scatter_add"),
    (define("SG_ERR_COO_DENSE_T") as u32, "coo_dense_t"),
    (define("SG_ERR_SPARSE_ADAM") as u32, "sparse_adam"),
    (define("SG_ERR_COO_COMPACT") as u32, "coo_compact_rows"),
    (define("SG_ERR_CROSS_ENTROPY") as u32, "cross_entropy"),
    (define("SG_ERR_COO_DENSIFY") as u32, "coo_densify"),
    (define("SG_ERR_COO_MM") as u32, "coo_mm"),
    (define("SG_ERR_TOPK_MAP") as u32, "topk_coo"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_come_from_common_cuh() {
        assert_eq!(THREADS, 256);
        assert_eq!(TILE, 256 * 16);
        assert_eq!(
            (TOPK_BINS, TOPK_STATE_WORDS, TOPK_MAX_JOBS, ADAMW_MAX_JOBS, SPARSE_ADAM_MAX_JOBS),
            (2048, 20, 4, 8, 8)
        );
        assert_eq!(CDT_CHUNK, 2048);
        assert_eq!((ATT_DMAX, ATT_F32_ROWS, ATT_BF16_FWD_ROWS, ATT_BF16_TILE), (128, 16, 64, 32));
        // Every SG_ERR_ bit of the header is named here, once, and the bits are distinct.
        let in_header = COMMON_CUH.lines().filter(|l| l.starts_with("#define SG_ERR_")).count();
        assert_eq!(in_header, ERR_BITS.len());
        for (i, (a, _)) in ERR_BITS.iter().enumerate() {
            assert!(a.is_power_of_two());
            assert!(ERR_BITS[i + 1..].iter().all(|(b, _)| a != b));
        }
    }
}
