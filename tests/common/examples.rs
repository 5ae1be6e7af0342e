//! The example binaries the example tests run as processes: built once per test binary
//! with the features their targets require, found from cargo's JSON messages (so a custom
//! target directory works too), and run with OpenBLAS told the core type.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Builds `examples/{name}` in release mode (with the `recipes` feature the examples need)
/// and returns its executable.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get_or_insert_with(HashMap::new).get(name) {
        return p.clone();
    }
    // scripts/test-cuda-emu.sh builds the examples first and names their directory: under its
    // ASan preload, cargo's `rustc -vV` crashes, so the tests must not run cargo there.
    if let Some(dir) = std::env::var_os("SPARSEGRAD_EXAMPLES_DIR") {
        let exe = PathBuf::from(dir).join(name);
        assert!(exe.is_file(), "SPARSEGRAD_EXAMPLES_DIR holds no {}", exe.display());
        built.get_or_insert_with(HashMap::new).insert(name.to_string(), exe.clone());
        return exe;
    }
    let out = Command::new(env!("CARGO"))
        .env_remove("LD_PRELOAD")
        .args(["build", "--release", "--features", "recipes", "--example", name])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cannot run cargo");
    assert!(out.status.success(), "cargo build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no executable for the example");
    built.get_or_insert_with(HashMap::new).insert(name.to_string(), exe.clone());
    exe
}

/// Debian's OpenBLAS misdetects some CPUs; name the core type as scripts/run-example.sh
/// does (`OPENBLAS_CORETYPE` if set, else SkylakeX with avx512f, else Haswell).
pub fn coretype() -> String {
    std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| {
        let avx512 = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("avx512f"));
        if avx512 { "SkylakeX" } else { "Haswell" }.into()
    })
}
