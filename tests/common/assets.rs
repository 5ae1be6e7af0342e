//! The real model and corpus some tests use (`assets/`, fetched by scripts/fetch-assets.sh),
//! and the one rule for when they are missing: the test prints `skipped: ...` and passes,
//! unless `SPARSEGRAD_REQUIRE_ASSETS=1` (scripts/test.sh sets it), where it fails naming
//! what is missing, so CI cannot pass without running them.

use std::path::{Path, PathBuf};

/// Set to `1` to make a test whose assets are missing fail instead of skipping.
pub const REQUIRE_ENV: &str = "SPARSEGRAD_REQUIRE_ASSETS";
/// SmolLM2-135M-Instruct (GGUF, with its tokenizer).
pub const SMOLLM_GGUF: &str = "assets/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The VADER corpus folder.
pub const VADER_DIR: &str = "assets/vader";
/// The movie-review snippets of the VADER corpus (the BERT example's default task).
pub const MOVIE_REVIEWS: &str = "assets/vader/movieReviewSnippets_GroundTruth.txt";

/// The crate root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `rel` under the crate root.
pub fn path(rel: &str) -> PathBuf {
    root().join(rel)
}

/// all-MiniLM-L6-v2: `SPARSEGRAD_MINILM_DIR`, else `assets/all-MiniLM-L6-v2`.
pub fn minilm_dir() -> PathBuf {
    std::env::var_os("SPARSEGRAD_MINILM_DIR").map(PathBuf::from).unwrap_or_else(|| path("assets/all-MiniLM-L6-v2"))
}

/// Whether [`REQUIRE_ENV`] asks for the assets.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Whether every path exists. If one does not, the test skips (prints `skipped: ...`, the
/// caller returns), or fails naming them when [`REQUIRE_ENV`] is `1`.
pub fn present(paths: &[&Path]) -> bool {
    present_or_fail(paths, required())
}

/// [`present`] with the requirement given (what the rule itself is tested with).
pub fn present_or_fail(paths: &[&Path], required: bool) -> bool {
    let missing: Vec<String> = paths.iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    if missing.is_empty() {
        return true;
    }
    let list = missing.join(", ");
    assert!(!required, "{REQUIRE_ENV}=1 but {list} not found (run scripts/fetch-assets.sh)");
    println!("skipped: {list} not found (run scripts/fetch-assets.sh)");
    false
}
