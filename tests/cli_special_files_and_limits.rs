//! The `sparsegrad` command line on the hostile inputs of issue 10, one test per recipe:
//! bounded sizes, FIFOs (no hang), special output files (never clobbered), permissions
//! kept, stale temp files cleaned, ambiguous headers refused, messages in user terms that
//! show the value the user wrote. Every failure: non-zero exit, one `error:` line.

mod common;

use common::cli::*;
use common::{rand_vec, rng};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A safetensors file whose header is exactly `header` (padded), followed by `data`.
fn raw_st(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend_from_slice(data);
    fs::write(path, b).unwrap();
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success());
}

/// Runs `args` and fails the test if it has not ended after `secs` (a hang).
fn run_bounded(args: &[&str], secs: u64) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparsegrad"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("sparsegrad {args:?} still running after {secs} s (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn one_error_line(o: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure, got success; stderr {err:?}");
    assert!(matches!(o.status.code(), Some(1 | 2)), "exit {:?}: {err}", o.status);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} lacks {n:?}", lines[0]);
    }
}

#[test]
fn fifo_inputs_fail_at_once_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("f");
    mkfifo(&fifo);
    let out = d.join("o.safetensors");
    let o = run_bounded(&["step", "--input", s(&fifo), "--output", s(&out)], 20);
    one_error_line(&o, &["FIFO", "not a regular file"]);
    let o = run_bounded(&["basis", "--grads", s(&fifo), "--output", s(&out)], 20);
    one_error_line(&o, &["FIFO"]);
    assert!(!out.exists());
}

#[test]
fn special_output_files_are_refused_and_permissions_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    StepInputs::new(3, 4, 3, 5, true).write(&input);
    // A FIFO, a symlink and a directory are never replaced by a regular file.
    let fifo = d.join("out-fifo");
    mkfifo(&fifo);
    let target = d.join("precious");
    fs::write(&target, b"keep me").unwrap();
    let link = d.join("out-link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let subdir = d.join("out-dir");
    fs::create_dir(&subdir).unwrap();
    for (out, what) in [(&fifo, "FIFO"), (&link, "symbolic link"), (&subdir, "directory")] {
        let o = run_bounded(&["step", "--input", s(&input), "--output", s(out)], 20);
        one_error_line(&o, &["refusing to replace", what]);
    }
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo_like());
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(&target).unwrap(), b"keep me");
    // A device node: /dev/null stays a character device (as root it used to be replaced).
    let o = run_bounded(&["step", "--input", s(&input), "--output", "/dev/null"], 20);
    one_error_line(&o, &["refusing to replace", "device"]);
    assert!(fs::metadata("/dev/null").unwrap().file_type().is_char_device_like());

    // An existing 0600 output keeps its mode.
    let out = d.join("out.safetensors");
    fs::write(&out, b"old").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o600)).unwrap();
    run_ok(&["step", "--input", s(&input), "--output", s(&out)]);
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    assert_ne!(fs::read(&out).unwrap(), b"old");
}

trait FileTypeLike {
    fn is_fifo_like(&self) -> bool;
    fn is_char_device_like(&self) -> bool;
}

impl FileTypeLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
    fn is_char_device_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_char_device(self)
    }
}

#[test]
fn stale_temp_files_of_dead_writers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    StepInputs::new(3, 4, 3, 5, true).write(&input);
    // PIDs above Linux's largest pid_max (2^22) never run.
    let stale = d.join(".out.safetensors.tmp-4194305-0");
    fs::write(&stale, b"half a file").unwrap();
    let unrelated = d.join(".out.safetensors.tmp-notes");
    fs::write(&unrelated, b"not ours").unwrap();
    run_ok(&["step", "--input", s(&input), "--output", s(&d.join("out.safetensors"))]);
    assert!(!stale.exists(), "stale temp file left behind");
    assert!(unrelated.exists(), "a file not of our naming was removed");
}

#[test]
fn step_bounds_and_messages_show_what_the_user_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    let out = d.join("out.safetensors");
    let args = ["step", "--input", s(&input), "--output", s(&out)];
    let case = |key: &str, value: &str, needles: &[&str]| {
        let mut i = StepInputs::new(4, 4, 3, 5, true);
        i.set(key, value);
        i.write(&input);
        expect_failure(d, &args, needles);
    };
    // steps = 10^9 ran ~15 h silently; now bounded before the first step.
    case("steps", "1000000000", &["`steps`", "1000000000", "1000000"]);
    case("eps", "1e-50", &["`eps`", "`1e-50`", "(0 in f32)", "> 0"]);
    case("lr", "1e39", &["`lr`", "`1e39`", "(inf in f32)"]);

    // A weight given transposed is reported on the weight, not on P.
    let i = StepInputs::new(5, 6, 5, 4, false);
    i.write_with(&input, |e| {
        e.retain(|t| t.0 != "weight");
        e.push(f32_entry("weight", &[5, 6], &rand_vec(&mut rng(1), 30)));
    });
    expect_failure(d, &args, &["`weight`", "[6, 5]", "[5, 6]", "transposed"]);
}

#[test]
fn ambiguous_or_inconsistent_safetensors_headers_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = d.join("in.safetensors");
    let out = d.join("out.safetensors");
    let args = ["basis", "--grads", s(&f), "--output", s(&out)];
    let data = vec![0u8; 24];
    let t = r#""dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]"#;
    raw_st(&f, &format!(r#"{{"up":{{{t}}},"up":{{{t}}}}}"#), &data);
    expect_failure(d, &args, &["`up`", "appears twice"]);
    raw_st(&f, &format!(r#"{{"__metadata__":{{"a":"1","a":"2"}},"up":{{{t}}}}}"#), &data);
    expect_failure(d, &args, &["`a`", "appears twice"]);
    // The crate's "invalid shape, data type, or offset for tensor" never said which.
    raw_st(&f, r#"{"up":{"dtype":"F32","shape":[1,2,4],"data_offsets":[0,24]}}"#, &data);
    expect_failure(d, &args, &["tensor `up`", "[1, 2, 4]", "data_offsets"]);
    let two = r#"{"a":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}"#;
    raw_st(&f, two, &data);
    expect_failure(d, &args, &["overlaps"]);
    // Control characters in a name from the file are escaped: one printable line.
    raw_st(&f, "{\"u\\r\\np\\u0000\":{\"dtype\":\"F32\",\"shape\":[1,2,4],\"data_offsets\":[0,24]}}", &data);
    let o = run(&args);
    one_error_line(&o, &["\\r\\n"]);
    assert!(!String::from_utf8_lossy(&o.stderr).trim_end().contains(['\r', '\0']));
}

#[test]
fn basis_memory_is_bounded_before_allocation_and_names_group_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 64 kB of gradients asking for a 16000 x 16000 Gram (it reached 4.9 GB, then failed
    // in LAPACK naming neither group nor file).
    let f = d.join("tall.safetensors");
    write_st(&f, &[f32_entry("up", &[1, 16000, 1], &rand_vec(&mut rng(2), 16000))], &[]);
    let out = d.join("basis.safetensors");
    let t0 = Instant::now();
    expect_failure(
        d,
        &["basis", "--grads", s(&f), "--output", s(&out)],
        &["group `up`", "tall.safetensors", "GiB", "--max-memory"],
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "refused only after {:?}", t0.elapsed());
    expect_failure(d, &["basis", "--grads", s(&f), "--output", s(&out), "--max-memory", "-1"], &["--max-memory", "-1"]);
    // The same stack under a limit that fits runs.
    let small = d.join("small.safetensors");
    write_st(&small, &[f32_entry("up", &[2, 40, 3], &rand_vec(&mut rng(3), 240))], &[]);
    run_ok(&["basis", "--grads", s(&small), "--output", s(&out), "--max-memory", "0.01"]);
    // N = 0 for every stack of a group: said in user terms, not GramAccumulator::basis.
    let zero = d.join("zero.safetensors");
    write_st(&zero, &[f32_entry("up", &[0, 4, 3], &[])], &[]);
    let o = run(&["basis", "--grads", s(&zero), "--output", s(&d.join("z.safetensors"))]);
    one_error_line(&o, &["`up`", "no gradients"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("GramAccumulator"));
}

#[test]
fn a_writer_killed_mid_write_leaves_a_temp_file_the_next_run_removes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in.safetensors");
    StepInputs::new(5, 40, 30, 5, true).write(&input);
    let out = d.join("out.safetensors");
    // `ulimit -f 1`: the write past 1 KiB raises SIGXFSZ and kills the process.
    let cmd = format!(
        "ulimit -f 1; exec '{}' step --input '{}' --output '{}'",
        env!("CARGO_BIN_EXE_sparsegrad"),
        s(&input),
        s(&out)
    );
    let st = Command::new("sh").args(["-c", &cmd]).status().unwrap();
    assert!(!st.success(), "the size limit should have killed the writer");
    let temps = || {
        fs::read_dir(d).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp-")).count()
    };
    assert_eq!(temps(), 1, "the killed writer leaves its temp file");
    assert!(!out.exists(), "nothing but the temp file was written");
    run_ok(&["step", "--input", s(&input), "--output", s(&out)]);
    assert_eq!(temps(), 0, "the next run removes the dead writer's temp file");
    assert!(out.is_file());
}
