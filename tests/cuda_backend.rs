//! The CUDA backend itself: construction errors, memory ops, memory accounting, dtype
//! errors, deferred index errors and allocation-free hot paths.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use half::bf16;
use sparsegrad::backend::{Coo, DenseOps, Gemm, IndexMaps, OptimOps, SparseOps, TopkOps};
use sparsegrad::{Backend, Cpu, Cuda, Error};

#[test]
fn new_returns_a_backend_or_an_error_and_never_panics() {
    let result = std::panic::catch_unwind(|| Cuda::new(0).map(|c| format!("{c:?}"))).expect("Cuda::new must not panic");
    match (kernels(), device_present()) {
        (false, _) => assert!(matches!(result, Err(Error::NoKernels)), "built without kernels, got {result:?}"),
        (true, true) => {
            let desc = result.expect("a device is present: Cuda::new(0) must succeed");
            println!("device: {desc}");
        }
        (true, false) => {
            assert!(matches!(result, Err(Error::CudaUnavailable(_))), "no device here, got {result:?}");
            println!("no CUDA device here: {}", result.unwrap_err());
        }
    }
}

#[test]
fn a_build_without_nvcc_reports_no_kernels() {
    if kernels() {
        println!("kernels are embedded in this build; nothing to check");
        return;
    }
    assert!(matches!(Cuda::new(0), Err(Error::NoKernels)));
    assert!(matches!(Cuda::new(7), Err(Error::NoKernels)));
}

cuda_test!(fn a_missing_device_ordinal_is_an_error(_cuda) {
    let r = Cuda::new(4096);
    assert!(matches!(r, Err(Error::CudaUnavailable(_))), "{r:?}");
});

fn check_memory<B: Backend>(dev: &B) {
    let mut r = rng(1);
    let f = rand_f32(&mut r, 1000);
    assert_bits("f32 round trip", &down(dev, &up(dev, &f), 1000), &f);
    let d: Vec<f64> = f.iter().map(|&v| v as f64 * 1.000001).collect();
    assert_same("f64 round trip", &down(dev, &up(dev, &d), 1000), &d);
    let h: Vec<bf16> = f.iter().map(|&v| bf16::from_f32(v)).collect();
    assert_same("bf16 round trip", &down(dev, &up(dev, &h), 1000), &h);
    let u: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2654435761)).collect();
    assert_same("u32 round trip", &down(dev, &up(dev, &u), 1000), &u);
    let s: Vec<i32> = u.iter().map(|&v| v as i32).collect();
    assert_same("i32 round trip", &down(dev, &up(dev, &s), 1000), &s);
    let b: Vec<u8> = u.iter().map(|&v| v as u8).collect();
    assert_same("u8 round trip", &down(dev, &up(dev, &b), 17), &b[..17]);

    let z: B::Buf<f32> = dev.alloc(1001).unwrap();
    assert_same("alloc is zeroed", &down(dev, &z, 1001), &vec![0.0f32; 1001]);
    let e: B::Buf<f32> = dev.alloc(0).unwrap();
    assert_eq!(dev.len(&e), 0);
    assert!(down(dev, &e, 0).is_empty());
    let e2 = up::<B, u32>(dev, &[]);
    assert_eq!(dev.len(&e2), 0);

    let mut buf = poisoned(dev, 10, 7.0f32);
    dev.upload_into(&[1.0, 2.0, 3.0], &mut buf).unwrap();
    assert_same("upload_into prefix", &down(dev, &buf, 10), &[1.0, 2.0, 3.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0]);
    assert!(matches!(dev.upload_into(&[0.0; 11], &mut buf), Err(Error::Shape { .. })));
    assert!(matches!(dev.download(&buf, 11), Err(Error::Shape { .. })));

    let src = up(dev, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let mut dst = poisoned(dev, 10, -1.0f32);
    dev.copy(&src, &mut dst, 5).unwrap();
    assert_same("copy prefix", &down(dev, &dst, 10), &[1.0, 2.0, 3.0, 4.0, 5.0, -1.0, -1.0, -1.0, -1.0, -1.0]);
    assert!(matches!(dev.copy(&src, &mut dst, 9), Err(Error::Shape { .. })));

    let mut fb = poisoned(dev, 300, 0.0f32);
    dev.fill(&mut fb, 257, 2.5).unwrap();
    let got = down(dev, &fb, 300);
    assert!(got[..257].iter().all(|&v| v == 2.5) && got[257..].iter().all(|&v| v == 0.0));
    let hb = poisoned(dev, 5, bf16::from_f32(-1.5));
    assert_same("fill bf16", &down(dev, &hb, 5), &[bf16::from_f32(-1.5); 5]);
    let ub = poisoned(dev, 33, 0xABu8);
    assert_same("fill u8", &down(dev, &ub, 33), &[0xABu8; 33]);
    let db = poisoned(dev, 3, -0.25f64);
    assert_same("fill f64", &down(dev, &db, 3), &[-0.25f64; 3]);
    let ib = poisoned(dev, 4, -7i32);
    assert_same("fill i32", &down(dev, &ib, 4), &[-7i32; 4]);
    let big = poisoned(dev, BIG, u32::MAX);
    let got = down(dev, &big, BIG);
    assert!(got.iter().all(|&v| v == u32::MAX), "fill over more than one grid");
    dev.synchronize().unwrap();
}

fn check_memory_stats<B: Backend>(dev: &B) {
    let before = dev.memory_stats();
    let buf: B::Buf<f32> = dev.alloc(1000).unwrap();
    let mid = dev.memory_stats();
    assert_eq!(mid.current_bytes, before.current_bytes + 4000);
    assert_eq!(mid.allocations, before.allocations + 1);
    assert!(mid.peak_bytes >= mid.current_bytes);
    drop(buf);
    assert_eq!(dev.memory_stats().current_bytes, before.current_bytes);
}

cuda_test!(fn memory_ops_cuda(cuda) {
    check_memory(&cuda);
    check_memory_stats(&cuda);
    assert_eq!(cuda.name(), "cuda");
});

#[test]
fn memory_ops_harness_on_cpu() {
    let cpu = Cpu::new();
    check_memory(&cpu);
    check_memory_stats(&cpu);
}

cuda_test!(fn f64_is_cpu_only(cuda) {
    let x = up(&cuda, &[1.0f64; 4]);
    let mut y = up(&cuda, &[1.0f64; 4]);
    let unsupported =
        |r: sparsegrad::Result<()>| matches!(r, Err(Error::UnsupportedDtype { dtype: "f64", backend: "cuda", .. }));
    assert!(unsupported(cuda.axpy(2.0f64, &x, &mut y, 4)));
    let (a, b) = (up(&cuda, &[1.0f64; 4]), up(&cuda, &[1.0f64; 4]));
    let mut c = up(&cuda, &[0.0f64; 4]);
    assert!(unsupported(cuda.gemm(&Gemm::nn(2, 2, 2), &a, &b, &mut c)));
    let mut h = poisoned(&cuda, 4, bf16::ZERO);
    assert!(unsupported(cuda.cast_to_bf16(&x, &mut h, 4)));
    let idx = up(&cuda, &[0u32]);
    let mut dst = up(&cuda, &[0.0f64; 4]);
    assert!(unsupported(cuda.gather_rows(&x, 1, 4, &idx, 1, &mut dst)));
    let mut ws = cuda.topk_workspace(4).unwrap();
    let mut out: Coo<Cuda, f64> = Coo::with_capacity(&cuda, 4, (2, 2)).unwrap();
    let maps = IndexMaps { row_map: None, col_map: None, full_shape: (2, 2) };
    assert!(unsupported(cuda.topk_coo(&x, 2, 2, 1, &maps, &mut ws, &mut out)));
});

cuda_test!(fn out_of_range_indices_are_reported_at_the_next_sync(cuda) {
    cuda.synchronize().unwrap();
    let src = up(&cuda, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let idx = up(&cuda, &[2u32, 9, 0]);
    let mut dst = poisoned(&cuda, 6, f32::NAN);
    cuda.gather_rows(&src, 3, 2, &idx, 3, &mut dst).expect("the launch itself succeeds");
    match cuda.synchronize() {
        Err(Error::InvalidArgument { op, .. }) => assert_eq!(op, "gather_rows"),
        other => panic!("expected a deferred gather_rows error, got {other:?}"),
    }
    cuda.synchronize().expect("the error word is cleared once reported");
    assert_bits(
        "valid rows still gathered, the bad one zeroed",
        &down(&cuda, &dst, 6),
        &[5.0, 6.0, 0.0, 0.0, 1.0, 2.0],
    );

    // SparseAdam with an entry outside the matrix: skipped, reported at the download.
    let mut coo: Coo<Cuda, f32> = Coo::with_capacity(&cuda, 2, (2, 2)).unwrap();
    cuda.upload_into(&[0u32, 5], &mut coo.rows).unwrap();
    cuda.upload_into(&[1u32, 0], &mut coo.cols).unwrap();
    cuda.upload_into(&[0.5f32, 0.5], &mut coo.values).unwrap();
    coo.len = 2;
    let (mut m, mut v) = (up(&cuda, &[0.0f32; 4]), up(&cuda, &[0.0f32; 4]));
    let mut clock = cuda.alloc::<u64>(2).unwrap();
    cuda.sparse_adam(&coo, &mut m, &mut v, &mut clock, &Default::default(), None, None, None).unwrap();
    assert!(matches!(cuda.download(&m, 4), Err(Error::InvalidArgument { op: "sparse_adam", .. })));
    let got = down(&cuda, &m, 4);
    assert!(got[1] != 0.0 && got[0] == 0.0 && got[2] == 0.0 && got[3] == 0.0, "{got:?}");
});

cuda_test!(fn hot_paths_allocate_nothing_after_warm_up(cuda) {
    let mut r = rng(5);
    let (rows, cols) = (777, 1234);
    let m = up(&cuda, &rand_sparse(&mut r, rows * cols, 0.5));
    let mut ri = poisoned(&cuda, rows, 0u32);
    let mut ci = poisoned(&cuda, cols, 0u32);
    let mut db = poisoned(&cuda, cols, 0.0f32);
    let mut ws = cuda.topk_workspace(rows * cols).unwrap();
    let mut out: Coo<Cuda, f32> = Coo::with_capacity(&cuda, 5000, (rows, cols)).unwrap();
    let (mut ur, mut slot) = (poisoned(&cuda, 5000, 0u32), poisoned(&cuda, 5000, 0u32));
    let maps = IndexMaps { row_map: None, col_map: None, full_shape: (rows, cols) };
    let mut c = poisoned(&cuda, rows * rows, 0.0f32);
    let mut step = |cuda: &Cuda| {
        cuda.nonzero_rows_cols(&m, rows, cols, 0.5, &mut ri, &mut ci).unwrap();
        cuda.bias_grad(&m, rows, cols, &mut db, 0.0).unwrap();
        cuda.count_nonfinite(&m, rows * cols).unwrap();
        cuda.topk_coo(&m, rows, cols, 5000, &maps, &mut ws, &mut out).unwrap();
        cuda.coo_compact_rows(&out, &mut ur, &mut slot).unwrap();
        cuda.gemm(&Gemm::nt(rows, rows, cols), &m, &m, &mut c).unwrap();
        cuda.synchronize().unwrap();
    };
    step(&cuda);
    let warm = cuda.memory_stats();
    for _ in 0..3 {
        step(&cuda);
    }
    let after = cuda.memory_stats();
    assert_eq!(after.allocations, warm.allocations, "ops allocated after warm-up");
    assert_eq!(after.current_bytes, warm.current_bytes);
});
