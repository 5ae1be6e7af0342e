//! `sparsegrad`: the method from any framework, through safetensors files.
//!
//! - `sparsegrad basis`: stacked gradients per layer group -> the group's basis `(P, Q)`.
//! - `sparsegrad step`: one SparseGrad linear layer run for a few steps on given inputs,
//!   writing every intermediate another implementation can be checked against.
//!
//! Every failure is one `error: ...` line on stderr and a non-zero exit (1: bad input or
//! failed computation, 2: malformed command line); no output file is created or changed.

mod args;
mod basis_cmd;
mod step_cmd;

use args::CliError;
use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

const HELP: &str = "\
sparsegrad: SparseGrad fine-tuning of transformer MLP weights (CPU reference)

Usage:
  sparsegrad basis --grads GRADS.safetensors [--grads ...] --output BASIS.safetensors
  sparsegrad step --input IN.safetensors --output OUT.safetensors
  sparsegrad <command> --help

Commands:
  basis   compute the basis (P, Q) of each layer group from stacked gradients
  step    run one SparseGrad linear layer on given inputs and write every intermediate

Options:
  -h, --help     print this help
  -V, --version  print the version
";

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Exactly one line, whatever a message from a dependency contains.
            let msg = sparsegrad::io::fs::escape(&e.msg, 4000);
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::from(e.code)
        }
    }
}

fn run(argv: &[OsString]) -> Result<(), CliError> {
    let Some(cmd) = argv.first() else {
        return Err(CliError::usage("missing command: expected `basis` or `step` (try `sparsegrad --help`)"));
    };
    let rest = &argv[1..];
    match cmd.to_str() {
        Some("basis") => basis_cmd::run(rest),
        Some("step") => step_cmd::run(rest),
        Some("-h" | "--help" | "help") => {
            print_out(HELP);
            Ok(())
        }
        Some("-V" | "--version") => {
            print_out(&format!("sparsegrad {}\n", env!("CARGO_PKG_VERSION")));
            Ok(())
        }
        _ => Err(CliError::usage(format!(
            "unknown command {cmd:?}: expected `basis` or `step` (try `sparsegrad --help`)"
        ))),
    }
}

/// Writes to stdout, ignoring a closed pipe (`sparsegrad --help | head` must not panic).
pub(crate) fn print_out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
