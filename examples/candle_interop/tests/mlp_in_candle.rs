//! A candle model whose MLP projections are sparsegrad layers, trained through candle's
//! autograd, against sparsegrad's own MLP block doing the same thing alone.
//!
//! The model: `out = x + down(gelu(up(x)))`, `loss = mean((out - target)^2)`, with `up`
//! and `down` [`SparseGradOp`]s, GELU, the residual and the loss in candle, and `x` a candle
//! variable (so candle's backward runs through both projections and `dx` reaches `x`).
//! 1. Preliminary phase: the projections in `Collect` mode; candle's backward leaves each
//!    one's dense weight gradient in the layer, which goes into the group's Grams.
//! 2. Training: SparseGrad (one layer transformed, one merged), a few steps of candle's
//!    backward followed by sparsegrad's SparseAdam step.
//!
//! The reference is sparsegrad's `BertMlp` with the same weights, bases and options, the
//! loss gradient computed by hand. Losses, outputs, the gradient candle gives `x`, the dense
//! gradients of the preliminary phase and the merged weights after training agree to 1e-5.

use candle_core::{Device, Tensor, Var};
use candle_interop::SparseGradOp;
use sparsegrad::backend::cpu::Cpu;
use sparsegrad::prelude::*;

const HIDDEN: usize = 12;
const FFN: usize = 20;
const TOKENS: usize = 9;
const PRELIM_STEPS: usize = 3;
const TRAIN_STEPS: usize = 4;
const TOL: f32 = 1e-5;

/// Deterministic values in about [-1, 1] (no random crate needed).
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + 1.0) * 0.7548 + seed * 1.618).sin() * ((i as f32) * 0.31 + seed).cos()).collect()
}

/// Inputs and targets of step `s`.
fn batch(s: usize) -> (Vec<f32>, Vec<f32>) {
    (values(TOKENS * HIDDEN, 10.0 + s as f32), values(TOKENS * HIDDEN, 50.0 + s as f32))
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .enumerate()
        .fold((0, 0.0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    assert!(err <= TOL, "{what}: worst relative error {err:e} at {i} (got {}, want {})", got[i], want[i]);
}

struct Weights {
    w_in: Vec<f32>,
    b_in: Vec<f32>,
    w_out: Vec<f32>,
    b_out: Vec<f32>,
}

fn weights() -> Weights {
    Weights {
        w_in: values(FFN * HIDDEN, 1.0).iter().map(|v| v * 0.4).collect(),
        b_in: values(FFN, 2.0).iter().map(|v| v * 0.1).collect(),
        w_out: values(HIDDEN * FFN, 3.0).iter().map(|v| v * 0.3).collect(),
        b_out: values(HIDDEN, 4.0).iter().map(|v| v * 0.1).collect(),
    }
}

fn options() -> TrainOptions {
    TrainOptions { optimizer: Optimizer::adam(1e-2), expected_tokens: TOKENS, ..Default::default() }
}

fn sparsegrad_method(formulation: Formulation) -> Method {
    Method::SparseGrad { keep: Keep::Fraction(0.1), selection: Selection::Exact, formulation: Some(formulation) }
}

/// The candle side: two ops and the model around them.
struct CandleMlp {
    up: SparseGradOp,
    down: SparseGradOp,
}

impl CandleMlp {
    fn new(cpu: &Cpu, w: &Weights, methods: [Method; 2], bases: Option<&[Basis; 2]>) -> Self {
        let build = |weight: &[f32], bias: &[f32], out, inp, method, basis: Option<&Basis>| {
            let mut b = LinearBuilder::new(weight, out, inp).bias(bias).method(method).options(options());
            if let Some(basis) = basis {
                b = b.basis(basis);
            }
            b.build(cpu).unwrap()
        };
        let up = build(&w.w_in, &w.b_in, FFN, HIDDEN, methods[0], bases.map(|b| &b[0]));
        let down = build(&w.w_out, &w.b_out, HIDDEN, FFN, methods[1], bases.map(|b| &b[1]));
        CandleMlp { up: SparseGradOp::new("up", cpu, up), down: SparseGradOp::new("down", cpu, down) }
    }

    /// One forward and backward through candle: `(loss, out, d loss / d x)`.
    fn run(&self, x: &[f32], target: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(x.to_vec(), (TOKENS, HIDDEN), &dev).unwrap()).unwrap();
        let target = Tensor::from_vec(target.to_vec(), (TOKENS, HIDDEN), &dev).unwrap();
        let h = self.up.forward(x.as_tensor()).unwrap();
        let y = self.down.forward(&h.gelu_erf().unwrap()).unwrap();
        let out = (x.as_tensor() + y).unwrap();
        let loss = (&out - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let dx = grads.get(x.as_tensor()).expect("candle's gradient of x");
        (
            loss.to_scalar::<f32>().unwrap(),
            out.flatten_all().unwrap().to_vec1().unwrap(),
            dx.flatten_all().unwrap().to_vec1().unwrap(),
        )
    }
}

/// The reference: sparsegrad's own block, the loss and its gradient by hand.
fn reference_run(cpu: &Cpu, block: &mut BertMlp<Cpu>, x: &[f32], target: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
    let n = TOKENS * HIDDEN;
    let xb = cpu.upload(x).unwrap();
    let mut y = cpu.alloc::<f32>(n).unwrap();
    block.forward(&xb, TOKENS, &mut y).unwrap();
    let out: Vec<f32> = cpu.download(&y, n).unwrap().iter().zip(x).map(|(y, x)| x + y).collect();
    let diff: Vec<f32> = out.iter().zip(target).map(|(o, t)| o - t).collect();
    let loss = diff.iter().map(|d| d * d).sum::<f32>() / n as f32;
    let g: Vec<f32> = diff.iter().map(|d| 2.0 * d / n as f32).collect();
    let mut dx = cpu.alloc::<f32>(n).unwrap();
    block.backward(&cpu.upload(&g).unwrap(), TOKENS, Some(&mut dx)).unwrap();
    // The residual adds g itself to the gradient of x.
    let dx: Vec<f32> = cpu.download(&dx, n).unwrap().iter().zip(&g).map(|(d, g)| d + g).collect();
    (loss, out, dx)
}

fn reference_block(cpu: &Cpu, w: &Weights, methods: [Method; 2], bases: Option<&[Basis; 2]>) -> BertMlp<Cpu> {
    let spec = |weight, bias, method, group, basis| ProjectionSpec { weight, bias: Some(bias), method, group, basis };
    BertMlp::new(
        cpu,
        MlpShape { hidden: HIDDEN, ffn: FFN },
        [
            spec(&w.w_in, &w.b_in, methods[0], "up", bases.map(|b| &b[0])),
            spec(&w.w_out, &w.b_out, methods[1], "down", bases.map(|b| &b[1])),
        ],
        BertMlpConfig { gelu: GeluKind::Erf, options: options() },
    )
    .unwrap()
}

#[test]
fn sparsegrad_layers_train_inside_a_candle_model_as_they_do_alone() {
    let cpu = Cpu::new();
    let w = weights();

    // 1. Preliminary phase through candle: dense gradients into the Grams.
    let collect = [Method::Collect, Method::Collect];
    let model = CandleMlp::new(&cpu, &w, collect, None);
    let mut reference = reference_block(&cpu, &w, collect, None);
    let mut grams = [GramAccumulator::new(FFN, HIDDEN), GramAccumulator::new(HIDDEN, FFN)];
    for s in 0..PRELIM_STEPS {
        let (x, target) = batch(s);
        let (loss, out, dx) = model.run(&x, &target);
        let (ref_loss, ref_out, ref_dx) = reference_run(&cpu, &mut reference, &x, &target);
        assert_close(&format!("collect step {s}: loss"), &[loss], &[ref_loss]);
        assert_close(&format!("collect step {s}: out"), &out, &ref_out);
        assert_close(&format!("collect step {s}: dx"), &dx, &ref_dx);
        for (i, op) in [&model.up, &model.down].into_iter().enumerate() {
            let dense = op.layer().dense_grad_host().unwrap();
            let want = reference.projections()[i].linear.dense_grad_host().unwrap();
            assert_close(&format!("collect step {s}: dense gradient of {}", ["up", "down"][i]), &dense, &want);
            grams[i].add(&dense).unwrap();
        }
    }
    let [g_up, g_down] = grams;
    let bases = [g_up.basis("up").unwrap(), g_down.basis("down").unwrap()];

    // 2. SparseGrad training: candle's backward, then sparsegrad's step.
    let methods = [sparsegrad_method(Formulation::Transformed), sparsegrad_method(Formulation::Merged)];
    let model = CandleMlp::new(&cpu, &w, methods, Some(&bases));
    let mut reference = reference_block(&cpu, &w, methods, Some(&bases));
    let mut losses = Vec::new();
    for s in 0..TRAIN_STEPS {
        let (x, target) = batch(s % 2);
        let (loss, out, dx) = model.run(&x, &target);
        let (ref_loss, ref_out, ref_dx) = reference_run(&cpu, &mut reference, &x, &target);
        assert_close(&format!("train step {s}: loss"), &[loss], &[ref_loss]);
        assert_close(&format!("train step {s}: out"), &out, &ref_out);
        assert_close(&format!("train step {s}: dx"), &dx, &ref_dx);
        model.up.step().unwrap();
        model.down.step().unwrap();
        reference.step().unwrap();
        losses.push(loss);
    }
    for (i, op) in [&model.up, &model.down].into_iter().enumerate() {
        let merged = op.layer().merged_weight().unwrap();
        let want = reference.projections()[i].linear.merged_weight().unwrap();
        assert_close(&format!("merged weight of {}", ["up", "down"][i]), &merged, &want);
        let base = if i == 0 { &w.w_in } else { &w.w_out };
        assert!(merged.iter().zip(base).any(|(a, b)| a != b), "training must change the weight");
    }
    // The same two batches again: training lowered the loss on them.
    assert!(losses[2] < losses[0] && losses[3] < losses[1], "losses: {losses:?}");
}

#[test]
fn a_bad_input_is_a_candle_error_not_a_panic() {
    let cpu = Cpu::new();
    let w = weights();
    let model = CandleMlp::new(&cpu, &w, [Method::Collect, Method::Collect], None);
    let wrong = Tensor::zeros((TOKENS, HIDDEN + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = model.up.forward(&wrong).unwrap_err().to_string();
    assert!(e.contains("expected 12 features per token, got 13"), "{e}");
    let f64s = Tensor::zeros((TOKENS, HIDDEN), candle_core::DType::F64, &Device::Cpu).unwrap();
    let e = model.up.forward(&f64s).unwrap_err().to_string();
    assert!(e.contains("only f32"), "{e}");
}
