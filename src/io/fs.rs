//! File-system guards shared by every loader and writer: open only regular files (never
//! blocking on a FIFO or a device), read small text files with a size cap, write
//! atomically without clobbering anything but a regular file, and escape untrusted text
//! before it reaches an error message.
//!
//! Why each guard exists:
//! - `open` on a FIFO blocks until a writer appears, so the file type is checked with
//!   `stat` first and the open itself is non-blocking (`O_NONBLOCK`, which is a no-op
//!   for regular files); the type is checked again on the open handle (the path could
//!   have been swapped in between).
//! - Replacing `/dev/null`, a FIFO or a symlink by a regular file destroys something the
//!   user did not ask to overwrite (as root even a device node), so [`write_atomic`]
//!   refuses any existing target that is not a regular file, and keeps the permissions of
//!   one that is.
//! - A writer killed mid-write (SIGKILL, SIGXFSZ) leaves its temp file `.NAME.tmp-PID-N`
//!   behind; the next write to the same target removes such files whose process no
//!   longer runs (checked through `/proc/PID`, so only where `/proc` exists; elsewhere
//!   they are left, never guessed about).

use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most bytes a JSON side file (config.json, index, tokenizer.json) may hold: the largest
/// real tokenizer.json files are tens of MB.
pub const MAX_TEXT_FILE_BYTES: u64 = 256 << 20;

/// What a non-regular file is, in the user's terms.
fn kind(ft: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, ft: &fs::FileType) -> Error {
    let k = kind(ft);
    let msg = if k.starts_with("not") { k.to_string() } else { format!("not a regular file ({k})") };
    Error::format(Some(path), msg)
}

/// Opens `path` for reading if it is a regular file (symlinks followed), without ever
/// blocking: a FIFO, device, socket or directory is an [`Error::Format`] saying which.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta.file_type()));
    }
    Ok(file)
}

/// The bytes of a regular file of at most `limit` bytes.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > limit {
        return Err(Error::format(Some(path), format!("{len} bytes is more than the {limit} this file may hold")));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The UTF-8 text of a regular file of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    let bytes = read_bytes(path, limit)?;
    String::from_utf8(bytes).map_err(|e| Error::format(Some(path), format!("not UTF-8 text: {e}")))
}

/// `s` with control characters (NUL, CR, escape sequences, ...) escaped and cut to
/// `max_chars`, so text from a file or a flag cannot break an error message into
/// several lines or drive the terminal.
pub fn escape(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == max_chars {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Distinguishes temp files of concurrent writes from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.tmp-")
}

/// Removes `dir/.NAME.tmp-PID-N` files left by writers that no longer run (see the
/// module docs). Best effort: a file that cannot be removed is left alone.
fn remove_stale_temps(dir: &Path, file_name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = temp_prefix(file_name);
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        let Some((pid, n)) = rest.split_once('-') else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else { continue };
        let ours_and_live = pid == std::process::id();
        if ours_and_live || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Writes a file through `write` atomically: into a new temp file beside `path`, synced,
/// then renamed over `path`. An existing `path` must be a regular file (not a symlink,
/// FIFO, device or directory: [`Error::Format`], nothing written); its permissions are
/// kept. On any error the temp file is removed and `path` is left as it was; I/O errors
/// name `path` (the temp name would only confuse).
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid("write", format!("{} has no usable file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let existing = match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Some(m.permissions()),
        Ok(m) => {
            let k = kind(&m.file_type());
            return Err(Error::format(
                Some(path),
                format!("refusing to replace {k}: only a regular file is overwritten"),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(path, e)),
    };
    remove_stale_temps(dir, file_name);
    let tmp: PathBuf = dir.join(format!(
        "{}{}-{}",
        temp_prefix(file_name),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let io = |e| Error::io(path, e);
    // create_new: never clobber (or later delete) a file this call did not create.
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
    let result = (|| {
        if let Some(perm) = existing {
            file.set_permissions(perm).map_err(io)?;
        }
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w).map_err(io)?;
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        // Checked again just before the rename: the target may have changed meanwhile.
        if let Ok(m) = fs::symlink_metadata(path) {
            if !m.is_file() {
                let k = kind(&m.file_type());
                return Err(Error::format(Some(path), format!("refusing to replace {k}")));
            }
        }
        fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}
