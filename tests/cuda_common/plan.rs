//! The memory-plan check shared by tests/cuda_memory_plan*.rs: build and train a LLaMA
//! model on a fresh CUDA backend and hold `MemoryPlan::llama` to the peak within 2%, by the
//! backend's own counters and, on the emulated device, by the emulator's count.

use sparsegrad::perf::emulator::read_windows;
use sparsegrad::plan::{MemoryPlan, PlanSetup};
use sparsegrad::{
    Backend, Basis, BasisSet, Cuda, Keep, LlamaConfig, LlamaModel, LlamaWeights, Method, ProfileOptions, TokenBatch,
    TrainingSetup,
};

pub fn methods(name: &str) -> Method {
    match name {
        "sparsegrad" => Method::sparsegrad(Keep::Fraction(0.01)),
        "lora" => Method::Lora { rank: 4, alpha: 8.0 },
        "meprop" => Method::MeProp { keep: Keep::Fraction(0.01) },
        _ => Method::Full,
    }
}

pub fn bases(c: &LlamaConfig) -> BasisSet {
    let mut set = BasisSet::new();
    // Distinct seeds: equal bases would share one device copy (gate and up have one shape).
    let groups = [("gate", (c.ffn, c.hidden)), ("up", (c.ffn, c.hidden)), ("down", (c.hidden, c.ffn))];
    for (seed, (g, (out, inp))) in groups.into_iter().enumerate() {
        set.insert(Basis::reflection(g, out, inp, 7 + seed as u64).unwrap());
    }
    set
}

/// Builds and trains the model on a fresh backend; returns the backend's peak and, when
/// emulated, the emulator's peak over the window (both relative to the bytes live before).
pub fn measure(setup: &PlanSetup, weights: &LlamaWeights, basis: &BasisSet, emulated: bool) -> (u128, Option<u128>) {
    let be = Cuda::new(0).unwrap();
    let before = be.memory_stats().current_bytes as u128;
    if emulated {
        be.profile_begin(ProfileOptions::default()).unwrap();
    }
    {
        let ts = TrainingSetup { plan: setup.plan.clone(), bases: Some(basis), options: setup.options };
        let mut model = LlamaModel::<Cuda>::new(&be, weights, &ts, setup.max_positions).unwrap();
        let t = setup.batch * setup.seq;
        let v = setup.config.vocab as u32;
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 11) % v).collect();
        let targets: Vec<u32> = (0..t as u32).map(|i| (i * 53 + 5) % v).collect();
        let mask = vec![1.0f32; t];
        let batch = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: setup.batch, seq: setup.seq };
        for _ in 0..2 {
            let loss = model.train_step(&batch).unwrap();
            assert!(loss.mean().is_finite());
        }
        be.synchronize().unwrap();
    }
    let peak = be.memory_stats().peak_bytes as u128 - before;
    let emu = if emulated {
        be.profile_end().unwrap();
        let path = std::env::var_os("SG_EMU_PROFILE").unwrap();
        let windows = read_windows(std::path::Path::new(&path)).unwrap();
        let w = windows.last().expect("the emulator wrote the window");
        Some(w.totals.peak_bytes as u128 - w.start_live_bytes as u128)
    } else {
        None
    };
    (peak, emu)
}

pub fn within(plan: u128, measured: u128, what: &str) {
    let diff = plan.abs_diff(measured) as f64 / measured as f64;
    assert!(
        diff <= 0.02,
        "{what}: the plan says {plan} bytes, the device peaked at {measured} ({:.2}% off)",
        diff * 100.0
    );
}

/// Plans `setup`, measures it and checks the plan against both peaks, printing all three.
pub fn check_case(setup: &PlanSetup, weights: &LlamaWeights, basis: &BasisSet, emulated: bool) {
    let plan = MemoryPlan::llama(setup).unwrap();
    let (peak, emu) = measure(setup, weights, basis, emulated);
    let (layers, precision) = (&setup.plan.layers, setup.options.precision);
    let name = setup.plan.methods.iter().find(|m| **m != Method::Frozen).map_or("frozen", |m| m.name());
    let label = format!("{name} {precision:?} blocks {layers:?} batch {} x {}", setup.batch, setup.seq);
    let off = |m: u128| (plan.total() as f64 - m as f64) / m as f64 * 100.0;
    let emu_off = emu.map(|e| format!("{:+.3}%", off(e)));
    println!("{label}: plan {} B, backend peak {peak} B ({:+.3}%), emulator {emu_off:?}", plan.total(), off(peak));
    let what = format!("{label}\n{}", plan.table());
    within(plan.total(), peak, &format!("{what} (backend counters)"));
    if let Some(e) = emu {
        within(plan.total(), e, &format!("{what} (emulated device)"));
    }
}
