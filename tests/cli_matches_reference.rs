//! The `sparsegrad` command line, run as a process on safetensors files built here:
//! `basis` (accumulation across files, orthogonality, layout, a check against the Grams)
//! and `step` (every output against an f64 reference computed in this file, SparseAdam and
//! Adam by hand), plus every kind of bad input: non-zero exit, one `error:` line naming
//! the problem, and the output directory untouched.

mod common;

use common::cli::*;
use common::{assert_close as close, matmul, rand_vec, rng, to32, to64 as f64s, transpose};
use sparsegrad::Formulation;
use std::path::Path;

// ---------------------------------------------------------------- f64 references

/// Top-k by magnitude (ties to the lower linear index), sorted by linear index; `None` if
/// the k-th and (k+1)-th magnitudes are too close for f32 to decide reliably (then the
/// test data, not the code, must change).
fn topk_ref(m: &[f64], k: usize) -> Option<Vec<usize>> {
    let mut order: Vec<usize> = (0..m.len()).collect();
    order.sort_by(|&a, &b| m[b].abs().total_cmp(&m[a].abs()).then(a.cmp(&b)));
    if k < m.len() {
        let (kth, next) = (m[order[k - 1]].abs(), m[order[k]].abs());
        if kth - next <= 1e-3 * m[order[0]].abs() {
            return None;
        }
    }
    let mut idx = order[..k].to_vec();
    idx.sort_unstable();
    Some(idx)
}

/// The f64 reference of one `step` run.
struct Reference {
    y: Vec<f64>,
    dx: Vec<f64>,
    db: Vec<f64>,
    /// The gradient of Wt the selection runs on (masked under sd with a threshold).
    dwt: Vec<f64>,
    wt0: Vec<f64>,
}

/// `None` when some `|gt|` lies too near the sd threshold for f32 to agree on the mask.
fn reference(inp: &StepInputs, threshold: Option<f64>) -> Option<Reference> {
    let (o, i, t) = (inp.out, inp.inp, inp.t);
    let (w, p, q, x, g) = (f64s(&inp.w), f64s(&inp.p), f64s(&inp.q), f64s(&inp.x), f64s(&inp.g));
    let mut y = matmul(&x, &transpose(&w, o, i), t, i, o);
    if let Some(b) = &inp.b {
        y.iter_mut().enumerate().for_each(|(e, v)| *v += b[e % o] as f64);
    }
    let dx = matmul(&g, &w, t, o, i);
    let db = (0..o).map(|c| (0..t).map(|r| g[r * o + c]).sum()).collect();
    let pt = transpose(&p, o, o);
    let wt0 = matmul(&matmul(&pt, &w, o, o, i), &q, o, i, i);
    let mut gt = matmul(&g, &p, t, o, o);
    if let Some(th) = threshold {
        let cut = th * gt.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for v in gt.iter_mut() {
            if (v.abs() - cut).abs() <= 1e-4 * cut {
                return None;
            }
            if v.abs() < cut {
                *v = 0.0;
            }
        }
    }
    let xt = matmul(&x, &q, t, i, i);
    let dwt = matmul(&transpose(&gt, t, o), &xt, o, t, i);
    Some(Reference { y, dx, db, dwt, wt0 })
}

/// The sd threshold in effect and `k`, from the metadata.
fn threshold_and_k(inp: &StepInputs) -> (Option<f64>, usize) {
    let sd = inp.get("selection") == Some("sd");
    let th = inp.get("sd_threshold").map(|v| v.parse().unwrap()).filter(|&th| sd && th > 0.0);
    (th, inp.get("keep").unwrap().parse().unwrap())
}

/// Whether the f64 reference decides the mask and the top-k clearly for these inputs.
fn well_posed(inp: &StepInputs) -> bool {
    let (th, k) = threshold_and_k(inp);
    reference(inp, th).is_some_and(|r| topk_ref(&r.dwt, k).is_some())
}

/// Inputs from the first seed at or after `seed` that [`well_posed`] accepts.
fn well_posed_inputs(seed: u64, make: impl Fn(u64) -> StepInputs) -> StepInputs {
    (seed..seed + 100).map(make).find(well_posed).expect("a well-posed seed within 100 tries")
}

/// Adam hyperparameters as the test wrote them.
#[derive(Clone, Copy)]
struct Hp {
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
}

/// PyTorch SparseAdam (and, for the bias, Adam) on a constant gradient for `steps` steps:
/// the parameter after them. `sparse` picks the SparseAdam bias correction form.
fn adam_ref(p0: f64, g: f64, steps: u64, hp: Hp, sparse: bool) -> f64 {
    let Hp { lr, b1, b2, eps } = hp;
    let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
    for t in 1..=steps as i32 {
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        p -= if sparse {
            lr * bc2.sqrt() / bc1 * m / (v.sqrt() + eps)
        } else {
            lr / bc1 * m / (v.sqrt() / bc2.sqrt() + eps)
        };
    }
    p
}

/// Runs `step` on `inp` and checks every output against the reference.
fn check_step(dir: &Path, inp: &StepInputs, tag: &str) {
    let (o, i, t) = (inp.out, inp.inp, inp.t);
    let in_path = dir.join(format!("{tag}.in.safetensors"));
    let out_path = dir.join(format!("{tag}.out.safetensors"));
    inp.write(&in_path);
    run_ok(&["step", "--input", s(&in_path), "--output", s(&out_path)]);
    let res = StFile::read(&out_path);

    let (threshold, k) = threshold_and_k(inp);
    let r = reference(inp, threshold).expect("test data: |gt| too close to the sd threshold");
    let steps: u64 = inp.get("steps").unwrap().parse().unwrap();
    let hp = |key: &str| -> f64 { inp.get(key).unwrap().parse().unwrap() };
    let hp = Hp { lr: hp("lr"), b1: hp("beta1"), b2: hp("beta2"), eps: hp("eps") };

    let (shape, y) = res.f32("y");
    assert_eq!(shape, [t, o], "{tag}: y shape");
    close(&format!("{tag}: y"), &y, &r.y, 1e-4, 1e-4);
    let (shape, dx) = res.f32("grad_x");
    assert_eq!(shape, [t, i], "{tag}: grad_x shape");
    close(&format!("{tag}: grad_x"), &dx, &r.dx, 1e-4, 1e-4);

    let want_idx = topk_ref(&r.dwt, k).expect("test data: top-k boundary too tight");
    let (shape, idx) = res.i64("grad_indices");
    assert_eq!(shape, [k, 2], "{tag}: grad_indices shape");
    let got_idx: Vec<usize> = idx.chunks_exact(2).map(|rc| rc[0] as usize * i + rc[1] as usize).collect();
    assert!(
        idx.chunks_exact(2).all(|rc| (0..o as i64).contains(&rc[0]) && (0..i as i64).contains(&rc[1])),
        "{tag}: index range"
    );
    assert_eq!(got_idx, want_idx, "{tag}: selected entries (linear indices, sorted)");
    let (shape, vals) = res.f32("grad_values");
    assert_eq!(shape, [k], "{tag}: grad_values shape");
    close(&format!("{tag}: grad_values"), &vals, &want_idx.iter().map(|&e| r.dwt[e]).collect::<Vec<_>>(), 1e-4, 1e-4);

    // Wt changes only at the selected entries, by SparseAdam on the (constant) gradient.
    let mut wt_want = r.wt0.clone();
    for (&e, &gv) in want_idx.iter().zip(&vals) {
        wt_want[e] = adam_ref(r.wt0[e], gv as f64, steps, hp, true);
    }
    let (shape, wt) = res.f32("weight_transformed");
    assert_eq!(shape, [o, i], "{tag}: weight_transformed shape");
    close(&format!("{tag}: weight_transformed"), &wt, &wt_want, 2e-5, 1e-5);
    // (Selected entries with a zero gradient, possible under sd, do not move.)
    let moved = wt.iter().zip(&r.wt0).filter(|(a, b)| (**a as f64 - **b).abs() > 1e-3).count();
    assert_eq!(moved, vals.iter().filter(|v| v.abs() > 1e-6).count(), "{tag}: entries of Wt that moved");
    // weight = P Wt Q^T of the written Wt.
    let (p, q) = (f64s(&inp.p), f64s(&inp.q));
    let merged = matmul(&matmul(&p, &f64s(&wt), o, o, i), &transpose(&q, i, i), o, i, i);
    let (shape, w) = res.f32("weight");
    assert_eq!(shape, [o, i], "{tag}: weight shape");
    close(&format!("{tag}: weight"), &w, &merged, 2e-5, 1e-5);

    match &inp.b {
        Some(b0) => {
            close(&format!("{tag}: grad_bias"), &res.f32("grad_bias").1, &r.db, 1e-5, 1e-5);
            let want: Vec<f64> = b0.iter().zip(&r.db).map(|(&b, &g)| adam_ref(b as f64, g, steps, hp, false)).collect();
            close(&format!("{tag}: bias"), &res.f32("bias").1, &want, 1e-5, 1e-5);
        }
        None => assert!(
            !res.tensors.contains_key("bias") && !res.tensors.contains_key("grad_bias"),
            "{tag}: bias outputs without a bias"
        ),
    }
    let want_form = match inp.get("formulation") {
        Some(f) => f.to_string(),
        None if threshold.is_some() => "transformed".into(),
        None => match Formulation::choose(o, i, t, k) {
            Formulation::Merged => "merged".into(),
            Formulation::Transformed => "transformed".into(),
        },
    };
    assert_eq!(res.meta.get("formulation"), Some(&want_form), "{tag}: formulation");
    assert_eq!(res.meta.get("k"), Some(&k.to_string()), "{tag}: k");
    assert_eq!(res.meta.get("steps"), Some(&steps.to_string()), "{tag}: steps");
}

// ---------------------------------------------------------------- step: happy paths

#[test]
fn step_matches_reference_across_options() {
    let dir = tempfile::tempdir().unwrap();
    let (o, i, t) = (6, 5, 7);
    let mut n = 0;
    for bias in [false, true] {
        for (selection, th) in [("exact", None), ("sd", Some("0")), ("sd", Some("0.5"))] {
            for form in [None, Some("transformed"), Some("merged")] {
                if th == Some("0.5") && form == Some("merged") {
                    continue;
                }
                for steps in ["1", "3"] {
                    for keep in [3, o * i] {
                        let inp = well_posed_inputs(11 + 100 * n, |seed| {
                            let mut inp = StepInputs::new(seed, o, i, t, bias);
                            inp.set("selection", selection).set("steps", steps).set("keep", &keep.to_string());
                            if let Some(th) = th {
                                inp.set("sd_threshold", th);
                            }
                            if let Some(f) = form {
                                inp.set("formulation", f);
                            }
                            inp
                        });
                        check_step(
                            dir.path(),
                            &inp,
                            &format!("case{n}-{selection}-{th:?}-{form:?}-s{steps}-k{keep}-b{bias}"),
                        );
                        n += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn step_default_formulation_follows_the_cost_model() {
    let dir = tempfile::tempdir().unwrap();
    // One token: the transformed form's T-proportional cost is the smaller one.
    let inp = well_posed_inputs(3, |seed| StepInputs::new(seed, 6, 5, 1, true));
    assert_eq!(Formulation::choose(6, 5, 1, 3), Formulation::Transformed);
    check_step(dir.path(), &inp, "t1");
    // Many tokens: merged.
    let inp = well_posed_inputs(4, |seed| StepInputs::new(seed, 6, 5, 40, false));
    assert_eq!(Formulation::choose(6, 5, 40, 3), Formulation::Merged);
    check_step(dir.path(), &inp, "t40");
}

#[test]
fn step_output_metadata_and_extra_input_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut inp = StepInputs::new(5, 4, 3, 5, true);
    // PyTorch's save_file writes `format: pt`; unknown keys and tensors are ignored.
    inp.set("format", "pt").set("comment", "anything");
    let in_path = dir.path().join("in.safetensors");
    inp.write_with(&in_path, |e| e.push(f32_entry("unused", &[2], &[1.0, 2.0])));
    let out_path = dir.path().join("out.safetensors");
    let o = run_ok(&["step", "--input", s(&in_path), "--output", s(&out_path)]);
    assert!(o.stderr.is_empty(), "no stderr on success: {}", String::from_utf8_lossy(&o.stderr));
    let res = StFile::read(&out_path);
    let names: Vec<&str> = res.tensors.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["bias", "grad_bias", "grad_indices", "grad_values", "grad_x", "weight", "weight_transformed", "y"]
    );
    assert_eq!(res.meta.get("format").map(String::as_str), Some("sparsegrad-step"));
    assert_eq!(res.meta.get("selection").map(String::as_str), Some("exact"));
    // No temp file left beside the output.
    let files: Vec<String> = snapshot(dir.path()).into_keys().collect();
    assert_eq!(files, ["in.safetensors", "out.safetensors"]);
}

// ---------------------------------------------------------------- basis

/// `sum_n G_n G_n^T` `(out, out)` and `sum_n G_n^T G_n` `(in, in)` in f64.
fn grams(g: &[f32], out: usize, inp: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut a, mut b) = (vec![0.0; out * out], vec![0.0; inp * inp]);
    for gn in g.chunks_exact(out * inp) {
        let gn = f64s(gn);
        let gt = transpose(&gn, out, inp);
        matmul(&gn, &gt, out, inp, out).iter().zip(a.iter_mut()).for_each(|(v, d)| *d += v);
        matmul(&gt, &gn, inp, out, inp).iter().zip(b.iter_mut()).for_each(|(v, d)| *d += v);
    }
    (a, b)
}

/// `M` orthogonal and `M^T S M` diagonal with entries `sigma^2`, descending.
fn check_factor(what: &str, m: &[f32], sigma: &[f32], gram: &[f64], n: usize) {
    let m = f64s(m);
    let mt = transpose(&m, n, n);
    let eye: Vec<f64> = (0..n * n).map(|e| if e / n == e % n { 1.0 } else { 0.0 }).collect();
    close(&format!("{what}: M^T M"), &to32(&matmul(&mt, &m, n, n, n)), &eye, 1e-5, 0.0);
    let d = matmul(&matmul(&mt, gram, n, n, n), &m, n, n, n);
    let scale = d[0].abs();
    let diag: Vec<f64> =
        (0..n * n).map(|e| if e / n == e % n { sigma[e / n] as f64 * sigma[e / n] as f64 } else { 0.0 }).collect();
    close(&format!("{what}: M^T S M = diag(sigma^2)"), &to32(&d), &diag, 1e-5 * scale, 1e-4);
    assert!(sigma.windows(2).all(|w| w[0] >= w[1]), "{what}: sigma descending");
}

#[test]
fn basis_accumulates_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = rng(7);
    let (up_a, up_b, down) = (rand_vec(&mut r, 3 * 6 * 5), rand_vec(&mut r, 4 * 6 * 5), rand_vec(&mut r, 2 * 5 * 6));
    let (a, b, all) = (d.join("a.safetensors"), d.join("b.safetensors"), d.join("all.safetensors"));
    write_st(&a, &[f32_entry("layers.up_proj", &[3, 6, 5], &up_a), f32_entry("down", &[2, 5, 6], &down)], &[]);
    write_st(&b, &[f32_entry("layers.up_proj", &[4, 6, 5], &up_b)], &[]);
    let up_all: Vec<f32> = up_a.iter().chain(&up_b).copied().collect();
    write_st(&all, &[f32_entry("layers.up_proj", &[7, 6, 5], &up_all), f32_entry("down", &[2, 5, 6], &down)], &[]);

    let (split, joined) = (d.join("split.basis"), d.join("joined.basis"));
    let o = run_ok(&["basis", "--grads", s(&a), "--grads", s(&b), "--output", s(&split)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("layers.up_proj: 7 gradients"), "summary: {:?}", o.stdout);
    run_ok(&["basis", "--grads", s(&all), "--output", s(&joined)]);

    let (fs_, fj) = (StFile::read(&split), StFile::read(&joined));
    let names: Vec<&str> = fs_.tensors.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "down.P",
            "down.Q",
            "down.sigma_in",
            "down.sigma_out",
            "layers.up_proj.P",
            "layers.up_proj.Q",
            "layers.up_proj.sigma_in",
            "layers.up_proj.sigma_out"
        ]
    );
    assert_eq!(fs_.meta.get("format").map(String::as_str), Some("sparsegrad-basis"));
    assert_eq!(fs_.meta.get("layers.up_proj.n_grads").map(String::as_str), Some("7"));
    assert_eq!(fs_.meta.get("down.n_grads").map(String::as_str), Some("2"));

    for (group, out, inp, g) in [("layers.up_proj", 6, 5, &up_all), ("down", 5, 6, &down)] {
        for (suffix, shape) in
            [("P", vec![out, out]), ("Q", vec![inp, inp]), ("sigma_out", vec![out]), ("sigma_in", vec![inp])]
        {
            assert_eq!(fs_.f32(&format!("{group}.{suffix}")).0, shape, "{group}.{suffix} shape");
        }
        // Split input = one file with all the gradients.
        for suffix in ["P", "Q", "sigma_out", "sigma_in"] {
            let name = format!("{group}.{suffix}");
            close(&format!("split vs joined {name}"), &fs_.f32(&name).1, &f64s(&fj.f32(&name).1), 1e-5, 1e-4);
        }
        // Independent check against the Grams computed here.
        let (go, gi) = grams(g, out, inp);
        let f = |suffix: &str| fs_.f32(&format!("{group}.{suffix}")).1;
        check_factor(&format!("{group} P"), &f("P"), &f("sigma_out"), &go, out);
        check_factor(&format!("{group} Q"), &f("Q"), &f("sigma_in"), &gi, inp);
    }
    // The library reads what the command line wrote.
    let set = sparsegrad::BasisSet::load(&split).expect("BasisSet::load");
    assert_eq!(set.bases.len(), 2);
    assert_eq!(set.get("layers.up_proj").unwrap().n_grads(), 7);
}
