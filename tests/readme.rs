//! The README as documentation that cannot rot silently: it must hold the library flow as a
//! ```rust block (src/lib.rs includes README.md under `cfg(doctest)`, so `cargo test --doc`
//! compiles and runs that block; with no block, the include would test nothing), and its
//! first two commands must name scripts that exist.

use std::path::Path;

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The bodies of every fenced block whose info string is exactly `lang`.
fn fenced_blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    // Inside a block: whether it is one of `lang`, and its body so far.
    let mut open: Option<(bool, String)> = None;
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => open = Some((info.trim() == lang, String::new())),
            (None, None) => {}
            (Some((wanted, body)), Some(_)) => {
                if *wanted {
                    blocks.push(std::mem::take(body));
                }
                open = None;
            }
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    blocks
}

#[test]
fn readme_holds_the_library_flow_as_a_rust_block() {
    let text = readme();
    let blocks = fenced_blocks(&text, "rust");
    assert!(!blocks.is_empty(), "README.md holds no ```rust block: `cargo test --doc` would test nothing");
    let flow = blocks.iter().find(|b| b.contains("fn main()")).expect("a ```rust block with fn main()");
    for step in ["GramAccumulator", ".basis(", ".step()", "save_adapter", "load_adapter", "merged_weight"] {
        assert!(flow.contains(step), "the README's library flow lacks `{step}`");
    }
}

#[test]
fn lib_rs_includes_the_readme_as_doctests() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    assert!(lib.contains("#[cfg(doctest)]") && lib.contains("include_str!(\"../README.md\")"));
}

#[test]
fn readme_opens_with_the_two_commands_and_they_exist() {
    let text = readme();
    let first = fenced_blocks(&text, "sh").into_iter().next().expect("a ```sh block");
    let commands: Vec<&str> =
        first.lines().filter_map(|l| l.split_whitespace().next()).filter(|c| !c.is_empty()).collect();
    assert_eq!(commands.get(..2), Some(&["scripts/run-example.sh", "scripts/test.sh"][..]), "{first}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for c in &commands[..2] {
        assert!(root.join(c).is_file(), "{c} does not exist");
    }
    // The first sh block comes before any section.
    assert!(text.find("```sh").unwrap() < text.find("\n## ").unwrap());
}
