//! Fixtures of the MLP-block tests: both block kinds behind one type, every training
//! method as a variant, random parameters and bases, and finite-difference helpers.

use super::*;
use sparsegrad::backend::cpu::CpuBuf;
use sparsegrad::linear::lora::{LoraConfig, LoraLinear};
use sparsegrad::linear::trainable::{Linear, Method, TrainOptions};
use sparsegrad::linear::LayerWeights;
use sparsegrad::mlp::{BertMlp, BertMlpConfig, LlamaMlp, MlpShape, Projection, ProjectionSpec};
use sparsegrad::{
    AdamParams, Basis, Cpu, Formulation, GeluKind, GramAccumulator, Keep, Optimizer, Precision, Real, Selection,
};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Bert,
    Llama,
}
pub const KINDS: [Kind; 2] = [Kind::Bert, Kind::Llama];

/// `(name, out, in, has bias)` of each projection, in `projections()` order.
pub fn layout(kind: Kind, hidden: usize, ffn: usize) -> Vec<(&'static str, usize, usize, bool)> {
    match kind {
        Kind::Bert => vec![("dense_in", ffn, hidden, true), ("dense_out", hidden, ffn, true)],
        Kind::Llama => vec![("gate", ffn, hidden, false), ("up", ffn, hidden, false), ("down", hidden, ffn, false)],
    }
}

/// The training methods under test. Sparse ones take `keep`, LoRA [`RANK`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    Frozen,
    Collect,
    Full,
    SgTransformed,
    SgMerged,
    Lora,
    MeProp,
}
pub const VARIANTS: [Variant; 7] = [
    Variant::Frozen,
    Variant::Collect,
    Variant::Full,
    Variant::SgTransformed,
    Variant::SgMerged,
    Variant::Lora,
    Variant::MeProp,
];

pub const RANK: usize = 2;
/// `s = alpha / r = 2`, so the LoRA scaling is exercised.
pub const ALPHA: f32 = 4.0;

pub fn method(v: Variant, keep: Keep) -> Method {
    let sg = |f| Method::SparseGrad { keep, selection: Selection::Exact, formulation: Some(f) };
    match v {
        Variant::Frozen => Method::Frozen,
        Variant::Collect => Method::Collect,
        Variant::Full => Method::Full,
        Variant::SgTransformed => sg(Formulation::Transformed),
        Variant::SgMerged => sg(Formulation::Merged),
        Variant::Lora => Method::Lora { rank: RANK, alpha: ALPHA },
        Variant::MeProp => Method::MeProp { keep },
    }
}

/// Weights and biases of every projection, in `projections()` order.
#[derive(Clone)]
pub struct Params<F> {
    pub w: Vec<Vec<F>>,
    pub b: Vec<Option<Vec<F>>>,
}

pub fn cast<F: Real>(v: &[f64]) -> Vec<F> {
    v.iter().map(|&x| F::from_f64(x)).collect()
}

pub fn random_params<F: Real>(r: &mut rand::rngs::SmallRng, kind: Kind, hidden: usize, ffn: usize) -> Params<F> {
    let mut p = Params { w: Vec::new(), b: Vec::new() };
    for (_, out, inp, bias) in layout(kind, hidden, ffn) {
        // Scaled like a trained layer, so activations stay O(1).
        let scale = 1.5 / (inp as f64).sqrt();
        p.w.push(cast(&rand_vec64(r, out * inp).iter().map(|v| v * scale).collect::<Vec<_>>()));
        p.b.push(bias.then(|| cast(&rand_vec64(r, out).iter().map(|v| 0.5 * v).collect::<Vec<_>>())));
    }
    p
}

pub fn random_bases(r: &mut rand::rngs::SmallRng, kind: Kind, hidden: usize, ffn: usize) -> Vec<Basis> {
    layout(kind, hidden, ffn).iter().map(|&(name, out, inp, _)| random_basis(r, name, out, inp)).collect()
}

#[allow(clippy::large_enum_variant)]
pub enum Block<F: Real> {
    Bert(BertMlp<Cpu, F>),
    Llama(LlamaMlp<Cpu, F>),
}

impl<F: Real> Block<F> {
    pub fn forward(&mut self, x: &CpuBuf<F>, t: usize, y: &mut CpuBuf<F>) {
        match self {
            Block::Bert(b) => b.forward(x, t, y),
            Block::Llama(b) => b.forward(x, t, y),
        }
        .expect("forward")
    }
    pub fn backward(&mut self, g: &CpuBuf<F>, t: usize, dx: Option<&mut CpuBuf<F>>) {
        match self {
            Block::Bert(b) => b.backward(g, t, dx),
            Block::Llama(b) => b.backward(g, t, dx),
        }
        .expect("backward")
    }
    pub fn step(&mut self) {
        match self {
            Block::Bert(b) => b.step(),
            Block::Llama(b) => b.step(),
        }
        .expect("step")
    }
    pub fn projections(&self) -> Vec<&Projection<Cpu, F>> {
        match self {
            Block::Bert(b) => b.projections().to_vec(),
            Block::Llama(b) => b.projections().to_vec(),
        }
    }
    pub fn projections_mut(&mut self) -> Vec<&mut Projection<Cpu, F>> {
        match self {
            Block::Bert(b) => b.projections_mut().into_iter().collect(),
            Block::Llama(b) => b.projections_mut().into_iter().collect(),
        }
    }
    pub fn trainable_parameters(&self) -> usize {
        match self {
            Block::Bert(b) => b.trainable_parameters(),
            Block::Llama(b) => b.trainable_parameters(),
        }
    }
    pub fn collect(&self, accs: &mut BTreeMap<String, GramAccumulator>) {
        match self {
            Block::Bert(b) => b.collect(accs),
            Block::Llama(b) => b.collect(accs),
        }
        .expect("collect")
    }
    /// `(merged weight, bias)` of every projection.
    pub fn merged(&self) -> Params<F> {
        let ps = self.projections();
        Params {
            w: ps.iter().map(|p| p.linear.merged_weight().expect("merged weight")).collect(),
            b: ps.iter().map(|p| p.linear.bias_host().expect("bias")).collect(),
        }
    }
}

/// Builds a block of `kind`; projection `i` trains by `methods[i]` in group `bases[i].group`.
#[allow(clippy::too_many_arguments)]
pub fn build<F: Real>(
    cpu: &Cpu,
    kind: Kind,
    hidden: usize,
    ffn: usize,
    p: &Params<F>,
    methods: &[Method],
    bases: &[Basis],
    opts: &TrainOptions,
) -> Block<F> {
    let spec = |i: usize| ProjectionSpec {
        weight: &p.w[i],
        bias: p.b[i].as_deref(),
        method: methods[i],
        group: bases[i].group(),
        basis: Some(&bases[i]),
    };
    match kind {
        Kind::Bert => Block::Bert(
            BertMlp::new(
                cpu,
                MlpShape { hidden, ffn },
                [spec(0), spec(1)],
                BertMlpConfig { gelu: GeluKind::Erf, options: *opts },
            )
            .expect("BertMlp::new"),
        ),
        Kind::Llama => Block::Llama(
            LlamaMlp::new(cpu, MlpShape { hidden, ffn }, [spec(0), spec(1), spec(2)], opts).expect("LlamaMlp::new"),
        ),
    }
}

pub fn sgd(lr: f32, t: usize) -> TrainOptions {
    TrainOptions { optimizer: Optimizer::Sgd { lr }, precision: Precision::Full, expected_tokens: t, seed: 3 }
}

pub fn adam(lr: f32, t: usize) -> TrainOptions {
    TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr, ..Default::default() }),
        precision: Precision::Full,
        expected_tokens: t,
        seed: 3,
    }
}

/// Replaces the projections of `block` marked in `mask` by LoRA layers with the given
/// factors `(A, B)`.
pub fn install_lora<F: Real>(
    cpu: &Cpu,
    block: &mut Block<F>,
    p: &Params<F>,
    factors: &[(Vec<F>, Vec<F>)],
    mask: &[bool],
    opts: &TrainOptions,
) {
    for (i, proj) in block.projections_mut().into_iter().enumerate().filter(|(i, _)| mask[*i]) {
        let (out, inp) = (proj.linear.out_features(), proj.linear.in_features());
        let (a, b) = &factors[i];
        let weights = LayerWeights::new(&p.w[i], out, inp).with_bias(p.b[i].as_deref());
        let config =
            LoraConfig { rank: RANK, alpha: ALPHA, optimizer: opts.optimizer, precision: opts.precision, seed: 0 };
        let lora = LoraLinear::from_factors(cpu, weights, (a, b), config);
        proj.linear = Linear::Lora(lora.expect("LoraLinear::from_factors"));
    }
}

pub fn lora_of<F: Real>(p: &Projection<Cpu, F>) -> &LoraLinear<Cpu, F> {
    match &p.linear {
        Linear::Lora(l) => l,
        _ => panic!("{} is not a LoRA projection", p.name),
    }
}

/// The bias gradient of a dense or SparseGrad projection (`None`: no trained bias).
pub fn bias_grad<F: Real>(p: &Projection<Cpu, F>) -> Option<Vec<F>> {
    match &p.linear {
        Linear::Dense(l) => l.bias_grad_host().expect("bias grad"),
        Linear::SparseGrad(l) => l.bias_grad_host().expect("bias grad"),
        Linear::Lora(_) => None,
    }
}

/// Analytic against finite-difference gradient: `|a - fd| <= 1e-6 (max|fd| + |fd|)`.
pub fn assert_fd(what: &str, analytic: &[f64], fd: &[f64]) {
    let scale = max_abs(fd);
    assert!(scale > 1e-3, "{what}: finite differences are all ~0 ({scale:e}): the check would be vacuous");
    assert_close(what, analytic, fd, 1e-6 * scale, 1e-6);
}

pub fn central(f: impl Fn(f64) -> f64) -> f64 {
    let h = 1e-6;
    (f(h) - f(-h)) / (2.0 * h)
}

pub fn axpy(v: &[f64], h: f64, dir: &[f64]) -> Vec<f64> {
    v.iter().zip(dir).map(|(a, d)| a + h * d).collect()
}

pub fn unit(n: usize, i: usize) -> Vec<f64> {
    let mut e = vec![0.0; n];
    e[i] = 1.0;
    e
}
