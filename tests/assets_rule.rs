//! The rule every asset-dependent test follows (tests/common/assets.rs): with its files
//! present it runs; without them it skips, or fails naming them when
//! `SPARSEGRAD_REQUIRE_ASSETS=1` (set by scripts/test.sh, so CI cannot pass silently).

mod common;

use common::assets::{present_or_fail, root};

#[test]
fn present_assets_run() {
    assert!(present_or_fail(&[&root().join("Cargo.toml"), &root().join("src")], true));
}

#[test]
fn missing_assets_skip_unless_required() {
    let missing = root().join("assets/no-such-model.gguf");
    assert!(!present_or_fail(&[&root().join("Cargo.toml"), &missing], false));
}

#[test]
fn missing_required_assets_fail_naming_them() {
    let missing = root().join("assets/no-such-model.gguf");
    let e = std::panic::catch_unwind(|| present_or_fail(&[&missing], true)).expect_err("must fail");
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("SPARSEGRAD_REQUIRE_ASSETS=1") && msg.contains("no-such-model.gguf"), "{msg}");
}
