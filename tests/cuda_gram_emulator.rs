//! The ledger of the device Gram accumulation held to the emulated device's own count:
//! the emulated cuBLAS counts each `cublasSsyrk_v2` (dimensions, types, compute) and the
//! emulated driver the download, independently of the library, and the two must agree
//! event by event. Alone in its binary: it points `SG_EMU_PROFILE` at a file before the
//! emulator first writes one, which no other test may race. On a GPU it checks nothing
//! beyond running (there is no independent count).
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use sparsegrad::perf::emulator::{check_against_ledger, read_windows};
use sparsegrad::{DeviceGramAccumulator, ProfileOptions};

cuda_test!(fn the_emulated_cublas_counts_the_syrks_the_ledger_records(cuda) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emu.jsonl");
    if cuda.is_emulated() {
        // The emulator opens the file on its first counted event, after this.
        std::env::set_var("SG_EMU_PROFILE", &path);
    }
    let (out, inp) = (17, 29);
    let mut r = rng(53);
    let mut acc = DeviceGramAccumulator::<sparsegrad::Cuda>::new(&cuda, out, inp);
    let g = up(&cuda, &rand_f32(&mut r, out * inp));
    acc.add(&g).unwrap();
    cuda.profile_begin(ProfileOptions::default()).unwrap();
    acc.add(&g).unwrap();
    acc.add(&g).unwrap();
    let host = acc.to_host().unwrap();
    let ledger = cuda.profile_end().unwrap();
    assert_eq!(host.count(), 3);
    assert_eq!(ledger.iter().filter(|e| e.is_launch()).count(), 4, "two SYRKs per gradient: {ledger:?}");
    if cuda.is_emulated() {
        let windows = read_windows(&path).unwrap();
        assert_eq!(windows.len(), 1);
        check_against_ledger(&ledger, &windows[0]).unwrap();
        assert_eq!(windows[0].totals.blas, 4);
    }
});
