//! sparsegrad inside an engine that owns the CUDA context, the stream and the tensors: a
//! backend made from the engine's stream (`Cuda::from_stream`), a SparseGrad layer run over
//! the engine's own device buffers (`Cuda::view` for inputs, `Cuda::with_view_mut` for
//! outputs) for several steps, matching the same layer on the backend's own stream and the
//! CPU to f32 rounding; the engine's buffers are neither freed nor counted, and
//! a backend buffer handed to the engine (`CudaBuf::into_slice`) keeps its contents.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::*;
use cuda_common::cuda_test;
use cudarc::driver::CudaContext;
use sparsegrad::{Backend, Cpu, Formulation, Keep, Optimizer, Selection, SparseGradConfig, SparseGradLinear};

/// `(y, dx)` of every step and the merged weight after the last, for a layer on `be`.
struct Trace {
    steps: Vec<(Vec<f32>, Vec<f32>)>,
    merged: Vec<f32>,
}

const OUT: usize = 24;
const INP: usize = 17;
const TOKENS: usize = 13;
const STEPS: usize = 4;

fn config(formulation: Formulation) -> SparseGradConfig {
    SparseGradConfig {
        keep: Keep::Count(40),
        selection: Selection::Exact,
        formulation: Some(formulation),
        optimizer: Optimizer::adam(1e-2),
        ..Default::default()
    }
}

/// Inputs of step `s`: `(x, g)`.
fn inputs(seed: u64, s: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = rng(seed + 100 + s as u64);
    (rand_vec(&mut r, TOKENS * INP), rand_vec(&mut r, TOKENS * OUT))
}

fn layer<B: Backend + Clone>(be: &B, seed: u64, formulation: Formulation) -> SparseGradLinear<B> {
    let mut r = rng(seed);
    let w = rand_vec(&mut r, OUT * INP);
    let b = rand_vec(&mut r, OUT);
    let basis = random_basis(&mut r, "g", OUT, INP);
    SparseGradLinear::new(be, &w, Some(&b), &basis, config(formulation)).unwrap()
}

/// The layer on a backend's own buffers.
fn trace_owned<B: Backend + Clone>(be: &B, seed: u64, formulation: Formulation) -> Trace {
    let mut l = layer(be, seed, formulation);
    let (mut y, mut dx) = (be.alloc::<f32>(TOKENS * OUT).unwrap(), be.alloc::<f32>(TOKENS * INP).unwrap());
    let mut steps = Vec::new();
    for s in 0..STEPS {
        let (x, g) = inputs(seed, s);
        let (x, g) = (be.upload(&x).unwrap(), be.upload(&g).unwrap());
        l.forward(&x, TOKENS, &mut y).unwrap();
        l.backward(&g, TOKENS, Some(&mut dx)).unwrap();
        l.step().unwrap();
        steps.push((be.download(&y, TOKENS * OUT).unwrap(), be.download(&dx, TOKENS * INP).unwrap()));
    }
    Trace { steps, merged: l.merged_weight().unwrap() }
}

cuda_test!(
    fn a_layer_runs_on_the_engines_stream_over_the_engines_buffers(cuda) {
        for (seed, formulation) in [(1, Formulation::Transformed), (2, Formulation::Merged)] {
            // The engine: its own handle on the context, a stream of its own, its tensors.
            let ctx = CudaContext::new(0).unwrap();
            let stream = ctx.new_stream().unwrap();
            let engine = sparsegrad::Cuda::from_stream(stream.clone()).unwrap();
            assert_eq!(engine.stream().cu_stream(), stream.cu_stream(), "the backend must queue on the engine's stream");
            assert_ne!(stream.cu_stream(), cuda.stream().cu_stream(), "the engine's stream is not the default one");

            let mut l = layer(&engine, seed, formulation);
            let mut y_engine = stream.alloc_zeros::<f32>(TOKENS * OUT).unwrap();
            let mut dx_engine = stream.alloc_zeros::<f32>(TOKENS * INP).unwrap();
            let mut after_first_step = None;
            let mut steps = Vec::new();
            for s in 0..STEPS {
                let (x, g) = inputs(seed, s);
                let (x_engine, g_engine) = (stream.clone_htod(&x).unwrap(), stream.clone_htod(&g).unwrap());
                let x = engine.view(&x_engine).unwrap();
                // A cudarc view of the engine's slice works as well as the slice itself.
                let g_view = g_engine.slice(..);
                let g = engine.view(&g_view).unwrap();
                engine.with_view_mut(&mut y_engine, |y| l.forward(&x, TOKENS, y)).unwrap().unwrap();
                engine.with_view_mut(&mut dx_engine, |dx| l.backward(&g, TOKENS, Some(dx))).unwrap().unwrap();
                l.step().unwrap();
                drop((x, g));
                steps.push((stream.clone_dtoh(&y_engine).unwrap(), stream.clone_dtoh(&dx_engine).unwrap()));
                after_first_step.get_or_insert(engine.memory_stats());
            }
            // The layer's buffers exist after the first step; views never count as allocations.
            let (first, last) = (after_first_step.unwrap(), engine.memory_stats());
            assert_eq!((last.allocations, last.current_bytes), (first.allocations, first.current_bytes));
            let got = Trace { steps, merged: l.merged_weight().unwrap() };

            // The same layer on the backend's own stream and buffers: the same values up to
            // the order of a few atomic sums (the emulator shuffles blocks, a GPU too).
            let own = trace_owned(&cuda, seed, formulation);
            let cpu = trace_owned(&Cpu::new(), seed, formulation);
            for (s, ((y, dx), ((y_own, dx_own), (y_cpu, dx_cpu)))) in
                got.steps.iter().zip(own.steps.iter().zip(&cpu.steps)).enumerate()
            {
                assert_close(&format!("{formulation:?} step {s}: y, engine's stream"), y, y_own, 1e-6, 1e-6);
                assert_close(&format!("{formulation:?} step {s}: dx, engine's stream"), dx, dx_own, 1e-6, 1e-6);
                assert_close(&format!("{formulation:?} step {s}: y vs cpu"), y, y_cpu, 1e-5, 1e-4);
                assert_close(&format!("{formulation:?} step {s}: dx vs cpu"), dx, dx_cpu, 1e-5, 1e-4);
            }
            assert_close(&format!("{formulation:?}: merged, engine's stream"), &got.merged, &own.merged, 1e-6, 1e-6);
            assert_close(&format!("{formulation:?}: merged vs cpu"), &got.merged, &cpu.merged, 1e-5, 1e-4);
        }
    }
);

cuda_test!(
    fn views_never_free_the_engines_memory_and_owned_buffers_move_to_the_engine(cuda) {
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let engine = sparsegrad::Cuda::from_stream(stream).unwrap();
        let host: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut mine = engine.stream().clone_htod(&host).unwrap();
        // Replacing the view inside the closure drops it; that must not free `mine`.
        engine
            .with_view_mut(&mut mine, |v| {
                assert_eq!(v.len(), host.len());
                *v = engine.alloc::<f32>(3).unwrap();
            })
            .unwrap();
        {
            let view = engine.view(&mine).unwrap();
            assert_eq!(engine.download(&view, host.len()).unwrap(), host);
        }
        engine.with_view_mut(&mut mine, |v| engine.fill(v, 5, 7.0f32)).unwrap().unwrap();
        let mut want = host.clone();
        want[..5].fill(7.0);
        assert_eq!(engine.stream().clone_dtoh(&mine).unwrap(), want);

        // A backend buffer handed over: no longer counted here, contents intact there.
        let before = engine.memory_stats().current_bytes;
        let buf = engine.upload(&host).unwrap();
        assert_eq!(engine.memory_stats().current_bytes, before + host.len() * 4);
        let slice = buf.into_slice().unwrap();
        assert_eq!(engine.memory_stats().current_bytes, before);
        assert_eq!(engine.stream().clone_dtoh(&slice).unwrap(), host);

        // The default backend and the engine's share the device; a view from a backend on
        // another stream of the same context works too.
        let other = cuda.view(&slice).unwrap();
        assert_eq!(cuda.download(&other, host.len()).unwrap(), host);
    }
);

/// Run only as a child of `a_view_swapped_out_of_its_scope_aborts`: moves a view out of
/// `with_view_mut`, which must abort the process before the view can outlive its buffer.
#[test]
#[ignore = "run by a_view_swapped_out_of_its_scope_aborts in a child process"]
fn child_swaps_a_view_out_of_its_scope() {
    let Ok(cuda) = sparsegrad::Cuda::new(0) else { return };
    let mut engine_buf = cuda.stream().alloc_zeros::<f32>(8).unwrap();
    let mut outside = cuda.alloc::<f32>(8).unwrap();
    cuda.with_view_mut(&mut engine_buf, |v| std::mem::swap(v, &mut outside)).unwrap();
    println!("not reached: the view escaped");
}

cuda_test!(
    fn a_view_swapped_out_of_its_scope_aborts(cuda) {
        drop(cuda);
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_swaps_a_view_out_of_its_scope", "--ignored", "--nocapture"])
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
        assert!(!child.status.success(), "the child must abort\nstdout: {stdout}\nstderr: {stderr}");
        assert!(stderr.contains("moved out of Cuda::with_view_mut"), "stderr: {stderr}");
        assert!(!stdout.contains("not reached"), "stdout: {stdout}");
    }
);
