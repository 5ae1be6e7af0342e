//! Library guards on what a caller or a file can get wrong: a backend allocation that
//! cannot be met is an error naming the buffer (never an abort), side files are parsed
//! strictly (a JSON key twice is refused at any depth; a FIFO is refused at once, never
//! waited on), and the atomic writer refuses to replace anything but a regular file.

use sparsegrad::io::fs::{escape, write_atomic};
use sparsegrad::{Backend, BertConfig, Cpu, Error, LlamaConfig};
use std::path::Path;

#[test]
fn cpu_allocation_failure_is_an_error_naming_the_buffer_and_bytes() {
    let cpu = Cpu::new();
    // Past isize::MAX (capacity overflow) and 70 TB (refused by the allocator): both
    // aborted the process through vec![..; len] before.
    for len in [usize::MAX / 8, 1usize << 44] {
        match cpu.alloc::<f32>(len) {
            Err(Error::OutOfMemory { what, bytes }) => {
                assert!(what.contains("cpu") && what.contains("f32"), "{what}");
                assert_eq!(bytes, len as u128 * 4);
            }
            other => panic!("alloc of {len} f32: expected OutOfMemory, got {:?}", other.map(|_| ())),
        }
    }
    let e = cpu.alloc::<f32>(1usize << 44).err().unwrap().to_string();
    assert!(e.contains("out of memory") && e.contains("70.4 TB"), "{e}");
    assert_eq!(cpu.memory_stats().current_bytes, 0, "a failed alloc must not count");
}

/// Both config readers on `text` written to a `config.json` in `dir`.
fn read_configs(dir: &Path, text: &str) -> [String; 2] {
    let path = dir.join("config.json");
    std::fs::write(&path, text).unwrap();
    [
        LlamaConfig::from_hf_config_json(&path).err().map(|e| e.to_string()).unwrap_or_default(),
        BertConfig::from_hf_config_json(&path).err().map(|e| e.to_string()).unwrap_or_default(),
    ]
}

#[test]
fn config_json_with_a_repeated_key_is_refused_at_any_depth() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        r#"{"hidden_size": 8, "hidden_size": 16}"#,
        r#"{"rope_scaling": {"factor": 1, "factor": 2}}"#,
        r#"{"architectures": [{"k": 1, "k": 1}]}"#,
    ] {
        for e in read_configs(dir.path(), bad) {
            assert!(e.contains("appears twice"), "{bad}: {e}");
        }
    }
}

#[test]
fn config_json_that_is_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in a fresh temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // No writer ever opens the FIFO: a reader that waited on it would hang this test.
    let e = LlamaConfig::from_hf_config_json(&path).unwrap_err().to_string();
    assert!(e.contains("FIFO"), "{e}");
    let e = BertConfig::from_hf_config_json(&path).unwrap_err().to_string();
    assert!(e.contains("FIFO"), "{e}");
}

#[test]
fn writer_refuses_special_targets_and_escape_keeps_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    std::fs::write(&target, b"keep").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = write_atomic(&link, |w| w.write_all(b"new")).expect_err("refused").to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(escape("a\r\nb\0c\u{1b}[2J", 100), "a\\r\\nb\\u{0}c\\u{1b}[2J");
    assert_eq!(escape("abcdef", 3), "abc...");
}
