//! Option parsing for the subcommands (`--name value` or `--name=value`, `-h`/`--help`)
//! and the one error type of the binary, which carries its exit code.
//!
//! Hand-rolled rather than clap: two subcommands with a handful of options, and every
//! failure must be exactly one `error: ...` line on stderr, which clap's multi-line
//! usage errors are not.

use sparsegrad::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Exit code for a run that failed on its input or while computing.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a malformed command line.
pub const EXIT_USAGE: u8 = 2;

/// A failure to report as one `error: {msg}` line.
#[derive(Debug)]
pub struct CliError {
    pub msg: String,
    pub code: u8,
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError { msg: msg.into(), code: EXIT_USAGE }
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError { msg: e.to_string(), code: EXIT_FAILURE }
    }
}

/// `e`, prefixed with the file it concerns unless its message already names it (as a
/// word of its own: a file called `x` is not named by "tensor `x`").
pub fn in_file(path: &Path, e: Error) -> CliError {
    let msg = e.to_string();
    let p = path.display().to_string();
    let named = msg.match_indices(&p).any(|(i, _)| {
        msg[..i].ends_with(' ') && msg[i + p.len()..].chars().next().is_none_or(|c| matches!(c, ':' | ' ' | ','))
    });
    let msg = if named { msg } else { format!("{p}: {msg}") };
    CliError { msg, code: EXIT_FAILURE }
}

/// An option a subcommand accepts (always with a value).
pub struct Opt {
    pub name: &'static str,
    pub repeatable: bool,
}

/// The options given, in order.
pub struct Parsed {
    pub help: bool,
    values: Vec<(&'static str, OsString)>,
}

impl Parsed {
    /// Every value of a repeatable option.
    pub fn all(&self, name: &str) -> Vec<PathBuf> {
        self.values.iter().filter(|(n, _)| *n == name).map(|(_, v)| PathBuf::from(v)).collect()
    }

    /// The value of a required option.
    pub fn required(&self, cmd: &str, name: &str) -> Result<PathBuf, CliError> {
        self.all(name).into_iter().next().ok_or_else(|| {
            CliError::usage(format!("missing required option `--{name}` (try `sparsegrad {cmd} --help`)"))
        })
    }
}

/// Parses `argv` (the arguments after the subcommand name) against `opts`. `--help`
/// anywhere wins over every other problem, as users reach for it when confused.
pub fn parse(cmd: &str, argv: &[OsString], opts: &[Opt]) -> Result<Parsed, CliError> {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Parsed { help: true, values: Vec::new() });
    }
    let hint = format!("try `sparsegrad {cmd} --help`");
    let mut values: Vec<(&'static str, OsString)> = Vec::new();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str() else {
            return Err(CliError::usage(format!("unexpected argument {arg:?} ({hint})")));
        };
        let Some(body) = text.strip_prefix("--") else {
            return Err(CliError::usage(format!(
                "unexpected argument `{text}`: `sparsegrad {cmd}` takes only options ({hint})"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(OsString::from(v))),
            None => (body, None),
        };
        let Some(opt) = opts.iter().find(|o| o.name == name) else {
            return Err(CliError::usage(format!("unknown option `--{name}` for `sparsegrad {cmd}` ({hint})")));
        };
        let value = match inline {
            Some(v) => v,
            // A following `--flag` is almost surely a forgotten value, not a file name;
            // `--name=--odd-file` still passes such a name.
            None => match it.next() {
                Some(v) if !v.to_str().is_some_and(|s| s.starts_with("--")) => v.clone(),
                _ => return Err(CliError::usage(format!("option `--{name}` needs a value ({hint})"))),
            },
        };
        if value.is_empty() {
            return Err(CliError::usage(format!("option `--{name}` has an empty value ({hint})")));
        }
        if !opt.repeatable && values.iter().any(|(n, _)| *n == opt.name) {
            return Err(CliError::usage(format!("option `--{name}` given more than once ({hint})")));
        }
        values.push((opt.name, value));
    }
    Ok(Parsed { help: false, values })
}
