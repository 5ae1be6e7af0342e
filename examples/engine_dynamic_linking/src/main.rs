//! An engine that owns CUDA: it links the CUDA libraries itself (cudarc's `dynamic-linking`,
//! as candle does), creates the context, a stream and its tensors, and runs a sparsegrad
//! layer on that stream over those tensors: `Cuda::from_stream`, `Cuda::view` for the
//! inputs, `Cuda::with_view_mut` for the outputs, then sparsegrad's optimizer step.
//!
//! scripts/test.sh `cargo check`s this crate: it proves the two linking choices no longer
//! collide (sparsegrad's `cuda` feature picks none). Running it needs a GPU and the CUDA
//! libraries; the same calls run on the emulated device in sparsegrad's tests/cuda_engine.rs.

use cudarc::driver::CudaContext;
use sparsegrad::prelude::*;

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let (out, inp, tokens) = (64, 32, 16);
    let data = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin()).collect::<Vec<f32>>();

    // The engine's context, stream and tensors.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let x = stream.clone_htod(&data(tokens * inp, 0.11))?;
    let grad_y = stream.clone_htod(&data(tokens * out, 0.23))?;
    let mut y = stream.alloc_zeros::<f32>(tokens * out)?;
    let mut grad_x = stream.alloc_zeros::<f32>(tokens * inp)?;

    // sparsegrad on the engine's stream.
    let cuda = Cuda::from_stream(stream.clone())?;
    let weight = data(out * inp, 0.37);
    let mut grams = GramAccumulator::new(out, inp);
    grams.add(&data(out * inp, 0.05))?;
    grams.add(&data(out * inp, 0.07))?;
    let basis = grams.basis("proj")?;
    let mut layer = LinearBuilder::new(&weight, out, inp)
        .method(Method::sparsegrad(Keep::Fraction(0.05)))
        .basis(&basis)
        .options(TrainOptions { optimizer: Optimizer::adam(1e-3), expected_tokens: tokens, ..Default::default() })
        .build(&cuda)?;
    for _ in 0..3 {
        let (x, grad_y) = (cuda.view(&x)?, cuda.view(&grad_y)?);
        cuda.with_view_mut(&mut y, |y| layer.forward(&x, tokens, y))??;
        cuda.with_view_mut(&mut grad_x, |dx| layer.backward(&grad_y, tokens, Some(dx)))??;
        layer.step()?;
    }
    let y = stream.clone_dtoh(&y)?;
    println!("y[0..4] = {:?} on {}", &y[..4], cuda.device_name());
    Ok(())
}
