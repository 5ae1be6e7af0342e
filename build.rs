//! Build script: links the system OpenBLAS (BLAS + LAPACK for the CPU backend) and
//! compiles every `cuda/*.cu` into a fatbin with nvcc, embedding the results.
//!
//! Environment:
//! - `SPARSEGRAD_BLAS_LIB_DIR`: directory holding libopenblas (default: the usual system dirs).
//! - `SPARSEGRAD_OPENBLAS_STATIC=1`: link libopenblas.a (plus libgfortran) statically, for
//!   binaries carried to a machine without OpenBLAS.
//! - `NVCC`, then `CUDA_HOME`/`CUDA_PATH` + `/bin/nvcc`, then `nvcc` on PATH.
//! - `SPARSEGRAD_CUDA_ARCHS`: gencode list, default `sm_80,sm_90,compute_90`.
//!
//! Without nvcc the crate still builds (with a warning); the CUDA backend then reports
//! "built without CUDA kernels" at run time. Without the `cuda` feature nvcc is not looked
//! for at all.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for var in [
        "SPARSEGRAD_BLAS_LIB_DIR",
        "SPARSEGRAD_OPENBLAS_STATIC",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "SPARSEGRAD_CUDA_ARCHS",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=build.rs");
    link_openblas();
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels();
    }
}

fn link_openblas() {
    let static_link = env::var("SPARSEGRAD_OPENBLAS_STATIC").map(|v| v == "1").unwrap_or(false);
    let file = if static_link { "libopenblas.a" } else { "libopenblas.so" };
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = env::var("SPARSEGRAD_BLAS_LIB_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    for dir in [
        format!("/usr/lib/{arch}-linux-gnu/openblas-pthread"),
        format!("/usr/lib/{arch}-linux-gnu"),
        "/usr/lib64".to_string(),
        "/usr/lib".to_string(),
        "/usr/local/lib".to_string(),
        "/opt/homebrew/opt/openblas/lib".to_string(),
    ] {
        dirs.push(PathBuf::from(dir));
    }
    let Some(dir) = dirs.iter().find(|d| d.join(file).exists()) else {
        panic!(
            "\n\nsparsegrad: {file} not found (searched {}).\n\
             Install OpenBLAS, e.g. `apt-get install libopenblas-dev` (Debian/Ubuntu) or\n\
             `dnf install openblas-devel`, or set SPARSEGRAD_BLAS_LIB_DIR to its directory.\n",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    };
    println!("cargo:rustc-link-search=native={}", dir.display());
    if static_link {
        println!("cargo:rustc-link-lib=static=openblas");
        // Debian's LAPACK inside OpenBLAS is Fortran: its runtime must come along.
        for lib in ["gfortran", "quadmath"] {
            if let Some(gcc_dir) = find_gcc_static(lib) {
                println!("cargo:rustc-link-search=native={}", gcc_dir.display());
                println!("cargo:rustc-link-lib=static={lib}");
            } else if lib == "gfortran" {
                panic!("sparsegrad: static OpenBLAS needs libgfortran.a: apt-get install libgfortran-12-dev");
            }
        }
        println!("cargo:rustc-link-lib=dylib=pthread");
        println!("cargo:rustc-link-lib=dylib=m");
    } else {
        println!("cargo:rustc-link-lib=dylib=openblas");
    }
}

fn find_gcc_static(lib: &str) -> Option<PathBuf> {
    let out = Command::new("gcc").arg(format!("-print-file-name=lib{lib}.a")).output().ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if path.is_absolute() && path.exists() {
        path.parent().map(Path::to_path_buf)
    } else {
        None
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(nvcc) = env::var("NVCC") {
        let path = PathBuf::from(nvcc);
        // An explicit NVCC that does not exist means "build without kernels": no fallback.
        return path.exists().then_some(path);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let path = Path::new(&home).join("bin").join("nvcc");
            if path.exists() {
                return Some(path);
            }
        }
    }
    let path_var = env::var_os("PATH")?;
    env::split_paths(&path_var).map(|d| d.join("nvcc")).find(|p| p.exists())
}

fn gencode_flags() -> Vec<String> {
    let archs = env::var("SPARSEGRAD_CUDA_ARCHS").unwrap_or_else(|_| "sm_80,sm_90,compute_90".into());
    archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|arch| {
            let num = arch.trim_start_matches("sm_").trim_start_matches("compute_");
            format!("-gencode=arch=compute_{num},code={arch}")
        })
        .collect()
}

fn compile_kernels() {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let mut sources: Vec<PathBuf> =
        fs::read_dir("cuda").map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    let generated = out_dir.join("kernels.rs");
    let Some(nvcc) = find_nvcc() else {
        println!(
            "cargo:warning=sparsegrad: nvcc not found (set NVCC or CUDA_HOME); building without CUDA \
             kernels: the CUDA backend will report an error at run time"
        );
        fs::write(&generated, "pub const HAS_KERNELS: bool = false;\npub const MODULES: &[(&str, &[u8])] = &[];\n")
            .expect("write kernels.rs");
        return;
    };
    let flags = gencode_flags();
    let handles: Vec<_> = sources
        .iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            let fatbin = out_dir.join(format!("{stem}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg("--fatbin")
                .arg("-O3")
                .arg("-std=c++17")
                .arg("-Werror=all-warnings")
                .arg("-Icuda")
                .args(&flags)
                .arg("-o")
                .arg(&fatbin)
                .arg(src);
            let src = src.clone();
            std::thread::spawn(move || (stem, fatbin, src, cmd.output()))
        })
        .collect();
    let mut entries = String::new();
    let mut failures = String::new();
    for handle in handles {
        let (stem, fatbin, src, output) = handle.join().expect("nvcc thread");
        match output {
            Ok(o) if o.status.success() => {
                entries.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", fatbin.display().to_string()));
            }
            Ok(o) => failures.push_str(&format!(
                "nvcc failed on {}:\n{}{}\n",
                src.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => failures.push_str(&format!("could not run {}: {e}\n", nvcc.display())),
        }
    }
    if !failures.is_empty() {
        panic!("\n\nsparsegrad: CUDA kernel compilation failed\n{failures}");
    }
    fs::write(
        &generated,
        format!("pub const HAS_KERNELS: bool = true;\npub const MODULES: &[(&str, &[u8])] = &[\n{entries}];\n"),
    )
    .expect("write kernels.rs");
}
