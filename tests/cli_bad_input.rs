//! The `sparsegrad` command line on bad input: malformed, missing, truncated and
//! inconsistent files and options each give a non-zero exit and one `error:` line naming
//! the problem, with the output directory untouched.

mod common;

use common::cli::*;
use common::{rand_vec, rng};
use safetensors::Dtype;
use std::fs;
use std::path::Path;

#[test]
fn basis_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = rng(9);
    let good = d.join("good.safetensors");
    write_st(&good, &[f32_entry("up", &[2, 4, 3], &rand_vec(&mut r, 2 * 4 * 3))], &[]);
    let out = d.join("out.safetensors");
    let o = s(&out);
    let bad = |name: &str, entries: Vec<Entry>| {
        let p = d.join(name);
        write_st(&p, &entries, &[]);
        p
    };

    let rank2 = bad("rank2.st", vec![f32_entry("up", &[4, 3], &rand_vec(&mut r, 4 * 3))]);
    expect_failure(d, &["basis", "--grads", s(&rank2), "--output", o], &["`up`", "rank 3", "rank2.st"]);
    let f64_bytes: Vec<u8> = (0..24).flat_map(|v| (v as f64).to_le_bytes()).collect();
    let f64t = bad("f64.st", vec![("up".into(), Dtype::F64, vec![2, 4, 3], f64_bytes)]);
    expect_failure(d, &["basis", "--grads", s(&f64t), "--output", o], &["`up`", "F64", "f64.st"]);
    let other = bad("other.st", vec![f32_entry("up", &[1, 3, 4], &rand_vec(&mut r, 3 * 4))]);
    expect_failure(
        d,
        &["basis", "--grads", s(&good), "--grads", s(&other), "--output", o],
        &["`up`", "[N, 4, 3]", "other.st"],
    );
    let mut nan = rand_vec(&mut r, 3 * 4 * 3);
    nan[20] = f32::NAN;
    let nan_f = bad("nan.st", vec![f32_entry("up", &[3, 4, 3], &nan)]);
    expect_failure(
        d,
        &["basis", "--grads", s(&good), "--grads", s(&nan_f), "--output", o],
        &["non-finite", "`up`", "index 20", "nan.st"],
    );
    let zero_n = bad("zero_n.st", vec![f32_entry("up", &[0, 4, 3], &[])]);
    expect_failure(d, &["basis", "--grads", s(&zero_n), "--output", o], &["no gradients", "`up`"]);
    let empty = bad("empty.st", vec![]);
    expect_failure(d, &["basis", "--grads", s(&empty), "--output", o], &["no tensors", "empty.st"]);
    common_file_failures(d, &["basis", "--grads"], &["--output", o]);

    expect_failure(d, &["basis", "--output", o], &["--grads"]);
    expect_failure(d, &["basis", "--grads", s(&good)], &["--output"]);
    expect_failure(d, &["basis", "--grads", s(&good), "--output", o, "--bogus", "1"], &["unknown option `--bogus`"]);
    expect_failure(d, &["basis", "--grads", s(&good), "--output"], &["`--output` needs a value"]);
    expect_failure(d, &["basis", "--grads", s(&good), "--output", o, "--output", o], &["more than once"]);
    expect_failure(d, &["basis", s(&good)], &["unexpected argument"]);
    let missing_dir = d.join("no/such/dir/out.safetensors");
    expect_failure(d, &["basis", "--grads", s(&good), "--output", s(&missing_dir)], &["I/O error", "out.safetensors"]);
}

/// Missing, unreadable, empty, corrupt and truncated input files, passed as the value of
/// the last word of `before`.
fn common_file_failures(d: &Path, before: &[&str], after: &[&str]) {
    let run_with = |input: &Path, needles: &[&str]| {
        let mut args: Vec<&str> = before.to_vec();
        args.push(s(input));
        args.extend_from_slice(after);
        expect_failure(d, &args, needles);
    };
    run_with(&d.join("does-not-exist.st"), &["I/O error", "does-not-exist.st"]);
    run_with(d, &["not a regular file"]);
    let empty = d.join("zero-bytes.st");
    fs::write(&empty, b"").unwrap();
    run_with(&empty, &["too short", "zero-bytes.st"]);
    let junk = d.join("junk.st");
    fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    run_with(&junk, &["corrupt", "junk.st"]);
    let huge = d.join("huge-header.st");
    fs::write(&huge, u64::MAX.to_le_bytes()).unwrap();
    run_with(&huge, &["corrupt", "huge-header.st"]);
    let full = d.join("full.st");
    write_st(&full, &[f32_entry("up", &[2, 4, 3], &[0.5; 24])], &[("steps".into(), "1".into())]);
    let bytes = fs::read(&full).unwrap();
    let trunc = d.join("truncated.st");
    fs::write(&trunc, &bytes[..bytes.len() - 5]).unwrap();
    run_with(&trunc, &["corrupt", "truncated", "truncated.st"]);
    fs::remove_file(&full).unwrap();
    for p in [empty, junk, huge, trunc] {
        fs::remove_file(p).unwrap();
    }
}

// ---------------------------------------------------------------- step: bad input

#[test]
fn step_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = StepInputs::new(21, 4, 3, 5, true);
    let input = d.join("in.safetensors");
    let out = d.join("out.safetensors");
    // A previous output must survive every failed run byte for byte.
    fs::write(&out, b"previous output").unwrap();
    let args = ["step", "--input", s(&input), "--output", s(&out)];

    let tensor_case = |edit: &dyn Fn(&mut Vec<Entry>), needles: &[&str]| {
        base.write_with(&input, |e| edit(e));
        expect_failure(d, &args, needles);
    };
    let replace = |name: &'static str, entry: Entry| {
        move |e: &mut Vec<Entry>| {
            e.retain(|t| t.0 != name);
            e.push(entry.clone());
        }
    };
    for name in ["weight", "P", "Q", "x", "grad_y"] {
        tensor_case(&|e: &mut Vec<Entry>| e.retain(|t| t.0 != name), &["missing tensor", &format!("`{name}`")]);
    }
    tensor_case(&replace("P", f32_entry("P", &[4, 5], &[0.0; 20])), &["`P`", "[4, 4]", "[4, 5]"]);
    tensor_case(&replace("Q", f32_entry("Q", &[4, 4], &[0.0; 16])), &["`Q`", "[3, 3]"]);
    tensor_case(&replace("x", f32_entry("x", &[5, 4], &[0.0; 20])), &["`x`", "[T, 3]"]);
    tensor_case(&replace("x", f32_entry("x", &[0, 3], &[])), &["`x`", "T >= 1"]);
    tensor_case(&replace("grad_y", f32_entry("grad_y", &[6, 4], &[0.0; 24])), &["`grad_y`", "[5, 4]"]);
    tensor_case(&replace("bias", f32_entry("bias", &[3], &[0.0; 3])), &["`bias`", "[4]"]);
    tensor_case(&replace("weight", f32_entry("weight", &[1, 4, 3], &[0.0; 12])), &["`weight`", "rank 2"]);
    let x64: Vec<u8> = (0..15).flat_map(|v| (v as f64).to_le_bytes()).collect();
    tensor_case(&replace("x", ("x".into(), Dtype::F64, vec![5, 3], x64)), &["`x`", "F64", "expected F32"]);
    let mut scaled = base.p.clone();
    scaled.iter_mut().for_each(|v| *v *= 1.01);
    tensor_case(
        &replace("P", f32_entry("P", &[4, 4], &scaled)),
        &["in.safetensors: invalid basis", "P is not orthogonal"],
    );
    let mut q_bad = base.q.clone();
    q_bad[4] += 0.01;
    tensor_case(
        &replace("Q", f32_entry("Q", &[3, 3], &q_bad)),
        &["in.safetensors: invalid basis", "Q is not orthogonal"],
    );
    for (name, shape, data) in [
        ("weight", vec![4, 3], &base.w),
        ("x", vec![5, 3], &base.x),
        ("grad_y", vec![5, 4], &base.g),
        ("bias", vec![4], base.b.as_ref().unwrap()),
        ("P", vec![4, 4], &base.p),
    ] {
        let mut v = data.clone();
        v[2] = if name == "x" { f32::INFINITY } else { f32::NAN };
        tensor_case(&replace(name, f32_entry(name, &shape, &v)), &["non-finite", &format!("`{name}`"), "index 2"]);
    }

    let meta_case = |edit: &dyn Fn(&mut StepInputs), needles: &[&str]| {
        let mut inp = StepInputs::new(21, 4, 3, 5, true);
        edit(&mut inp);
        inp.write(&input);
        expect_failure(d, &args, needles);
    };
    meta_case(
        &|i| {
            i.set("keep", "0");
        },
        &["`keep`", "1..=12"],
    );
    meta_case(
        &|i| {
            i.set("keep", "13");
        },
        &["`keep`", "13"],
    );
    meta_case(
        &|i| {
            i.set("keep", "-1");
        },
        &["`keep`", "-1"],
    );
    meta_case(
        &|i| {
            i.set("keep", "2.5");
        },
        &["`keep`"],
    );
    for key in ["keep", "selection", "lr", "beta1", "beta2", "eps", "steps"] {
        meta_case(
            &|i| {
                i.unset(key);
            },
            &[&format!("`{key}`"), "missing"],
        );
    }
    meta_case(
        &|i| {
            i.set("lr", "fast");
        },
        &["`lr`", "fast"],
    );
    meta_case(
        &|i| {
            i.set("lr", "nan");
        },
        &["`lr`", "finite"],
    );
    meta_case(
        &|i| {
            i.set("lr", "-0.1");
        },
        &["`lr`"],
    );
    meta_case(
        &|i| {
            i.set("beta1", "1");
        },
        &["`beta1`"],
    );
    meta_case(
        &|i| {
            i.set("beta2", "inf");
        },
        &["`beta2`"],
    );
    meta_case(
        &|i| {
            i.set("eps", "0");
        },
        &["`eps`"],
    );
    meta_case(
        &|i| {
            i.set("steps", "0");
        },
        &["`steps`"],
    );
    meta_case(
        &|i| {
            i.set("steps", "three");
        },
        &["`steps`", "three"],
    );
    meta_case(
        &|i| {
            i.set("selection", "topk");
        },
        &["`selection`", "topk"],
    );
    meta_case(
        &|i| {
            i.set("selection", "sd");
        },
        &["`sd_threshold`", "missing"],
    );
    meta_case(
        &|i| {
            i.set("selection", "sd").set("sd_threshold", "1.5");
        },
        &["`sd_threshold`"],
    );
    meta_case(
        &|i| {
            i.set("selection", "sd").set("sd_threshold", "x");
        },
        &["`sd_threshold`"],
    );
    meta_case(
        &|i| {
            i.set("formulation", "dense");
        },
        &["`formulation`", "dense"],
    );
    meta_case(
        &|i| {
            i.set("selection", "sd").set("sd_threshold", "0.3").set("formulation", "merged");
        },
        &["`formulation`", "merged"],
    );

    base.write(&input);
    expect_failure(d, &["step", "--input", s(&input)], &["--output"]);
    expect_failure(d, &["step", "--output", s(&out)], &["--input"]);
    expect_failure(
        d,
        &["step", "--input", s(&input), "--output", s(&out), "--steps", "2"],
        &["unknown option `--steps`"],
    );
    expect_failure(d, &["step", "--input", "--output", s(&out)], &["`--input` needs a value"]);
    expect_failure(d, &["step", "--input=", "--output", s(&out)], &["empty value"]);
    expect_failure(d, &["step", "extra", "--input", s(&input), "--output", s(&out)], &["unexpected argument `extra`"]);
    expect_failure(d, &["stpe"], &["unknown command"]);
    expect_failure(d, &[], &["missing command"]);
    common_file_failures(d, &["step", "--output", s(&out), "--input"], &[]);
    assert_eq!(fs::read(&out).unwrap(), b"previous output");
}

#[test]
fn step_rejects_overflowing_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut inp = StepInputs::new(22, 4, 3, 5, false);
    // Finite inputs whose products overflow f32: y = x W^T = 9e38.
    inp.x.iter_mut().for_each(|v| *v = 3e38);
    inp.w.iter_mut().for_each(|v| *v = 1.0);
    let input = d.join("in.safetensors");
    inp.write(&input);
    expect_failure(d, &["step", "--input", s(&input), "--output", s(&d.join("out.safetensors"))], &["non-finite"]);
}

#[test]
fn help_and_version() {
    for args in [&["--help"][..], &["help"], &["basis", "--help"], &["step", "-h"], &["step", "--input", "x", "--help"]]
    {
        let o = run_ok(args);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Usage:"), "{args:?}: {out}");
        assert!(o.stderr.is_empty());
    }
    let o = run_ok(&["step", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["grad_indices", "sd_threshold", "formulation", "weight_transformed"] {
        assert!(text.contains(word), "step --help should document {word}");
    }
    let o = run_ok(&["--version"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("sparsegrad "));
}

// ------------------------------------------- inputs once accepted without a word (issue 21)

#[test]
fn basis_refuses_unusable_group_names_and_all_zero_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.safetensors");
    let grads = rand_vec(&mut rng(5), 2 * 4 * 3);
    let input = d.join("g.safetensors");
    let args = ["basis", "--grads", s(&input), "--output", s(&out)];
    for (name, needles) in [
        ("up\nproj", vec!["`up\\nproj`", "control character", "g.safetensors"]),
        ("gate\u{1b}[2J", vec!["`gate\\u{1b}[2J`", "control character"]),
        ("__metadata__x", vec!["`__metadata__x`", "safetensors reserves"]),
    ] {
        write_st(&input, &[f32_entry(name, &[2, 4, 3], &grads)], &[]);
        expect_failure(d, &args, &needles);
        assert!(run(&args).stdout.is_empty(), "{name:?}: nothing may be printed on stdout");
    }
    // All-zero gradients: no basis to find; the refusal names the group and the file.
    write_st(&input, &[f32_entry("up", &[3, 4, 3], &[0.0; 36])], &[]);
    expect_failure(d, &args, &["`up`", "all 3 gradients added are zero", "g.safetensors"]);
    // Some zero gradients among others are fine.
    let mut mixed = grads.clone();
    mixed.extend([0.0; 12]);
    write_st(&input, &[f32_entry("up", &[3, 4, 3], &mixed)], &[]);
    run_ok(&args);
}

#[test]
fn step_refuses_a_negative_zero_and_unknown_entry_fields() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    let out = d.join("out.safetensors");
    let args = ["step", "--input", s(&input), "--output", s(&out)];
    for (key, value) in [("lr", "-0"), ("lr", "-0.0"), ("beta1", "-0"), ("sd_threshold", "-0")] {
        let mut inp = StepInputs::new(21, 4, 3, 5, true);
        inp.set(key, value);
        inp.write(&input);
        let needles: &[&str] = if key == "sd_threshold" { &["`sd_threshold`", "-0"] } else { &[key, "negative zero"] };
        expect_failure(d, &args, needles);
    }
    let base = StepInputs::new(21, 4, 3, 5, true);
    base.write(&input);
    run_ok(&args);
    fs::remove_file(&out).unwrap();
    edit_header(&input, |h| {
        h["x"]["offset"] = serde_json::json!(3);
    });
    expect_failure(d, &args, &["tensor `x`", "unknown field `offset`", "in.safetensors"]);
}
