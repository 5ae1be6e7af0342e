//! The emulated device's own counts (`cuda/emu/profile.cpp`): the JSON lines the fake
//! driver and cuBLAS write to the file named by `SG_EMU_PROFILE`, read back per
//! `cuProfilerStart` / `cuProfilerStop` window, and [`check_against_ledger`], which holds
//! the library's ledger to them event by event. The two counts are independent: the ledger
//! is written by the Rust backend before it calls the driver, the emulator's by the
//! driver entry points it reaches.

use super::{BlasRoutine, CopyDir, Event, EventKind, GemmCompute};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// One event as the emulated driver or cuBLAS saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum EmulatedEvent {
    Launch {
        name: String,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
    },
    /// A cuBLAS call: `m, n, k` as cuBLAS takes them (column-major), types by name
    /// (`f32`, `bf16`), compute type (`32F`, `32F_FAST_TF32`, ...) and math mode.
    Blas {
        routine: String,
        m: u64,
        n: u64,
        k: u64,
        batch: u64,
        a: String,
        c: String,
        compute: String,
        math: String,
    },
    Sync {
        what: String,
    },
    Copy {
        dir: CopyDir,
        bytes: u64,
        blocking: bool,
    },
    Memset {
        bytes: u64,
    },
    Alloc {
        bytes: u64,
    },
    Free {
        bytes: u64,
    },
    GraphLaunch {
        nodes: u64,
    },
}

/// A window's totals, as the emulator counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatedTotals {
    pub launches: u64,
    pub blas: u64,
    pub syncs: u64,
    pub blocking_copies: u64,
    pub memsets: u64,
    pub allocs: u64,
    pub frees: u64,
    pub graph_launches: u64,
    /// Events recorded into a stream capture (nodes of a graph).
    pub captured: u64,
    pub htod_bytes: u64,
    pub dtoh_bytes: u64,
    pub dtod_bytes: u64,
    /// Device bytes allocated at the window's end, and the most at any point inside it.
    pub live_bytes: u64,
    pub peak_bytes: u64,
}

/// One closed window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EmulatedWindow {
    pub events: Vec<EmulatedEvent>,
    /// Per event: recorded into a stream capture (run later, by graph launches).
    pub captured: Vec<bool>,
    pub totals: EmulatedTotals,
    /// Device bytes allocated when the window opened.
    pub start_live_bytes: u64,
}

fn bad(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::format(Some(path), format!("line {line}: {msg}"))
}

fn field_u64(v: &Value, key: &str, path: &Path, line: usize) -> Result<u64> {
    v.get(key).and_then(Value::as_u64).ok_or_else(|| bad(path, line, format!("no integer `{key}`")))
}

fn field_str(v: &Value, key: &str, path: &Path, line: usize) -> Result<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string).ok_or_else(|| bad(path, line, format!("no string `{key}`")))
}

fn dims(v: &Value, key: &str, path: &Path, line: usize) -> Result<[u32; 3]> {
    let a = v.get(key).and_then(Value::as_array).filter(|a| a.len() == 3);
    let a = a.ok_or_else(|| bad(path, line, format!("`{key}` is not three integers")))?;
    let mut out = [0u32; 3];
    for (o, x) in out.iter_mut().zip(a) {
        *o = x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(path, line, format!("`{key}` entry")))?;
    }
    Ok(out)
}

/// Every closed window of a profile file, in order. A window still open at the end of the
/// file (no `stop` line) is an error: the run did not close its measured window.
pub fn read_windows(path: &Path) -> Result<Vec<EmulatedWindow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut windows = Vec::new();
    let mut open: Option<EmulatedWindow> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(raw).map_err(|e| bad(path, line, e))?;
        let ev = field_str(&v, "ev", path, line)?;
        if ev == "start" {
            if open.is_some() {
                return Err(bad(path, line, "a window opens inside another"));
            }
            open = Some(EmulatedWindow { start_live_bytes: field_u64(&v, "live", path, line)?, ..Default::default() });
            continue;
        }
        let w = open.as_mut().ok_or_else(|| bad(path, line, "an event outside any window"))?;
        let u = |k: &str| field_u64(&v, k, path, line);
        let e = match ev.as_str() {
            "stop" => {
                w.totals = EmulatedTotals {
                    launches: u("launches")?,
                    blas: u("blas")?,
                    syncs: u("syncs")?,
                    blocking_copies: u("blocking_copies")?,
                    memsets: u("memsets")?,
                    allocs: u("allocs")?,
                    frees: u("frees")?,
                    graph_launches: u("graph_launches")?,
                    captured: u("captured")?,
                    htod_bytes: u("htod_bytes")?,
                    dtoh_bytes: u("dtoh_bytes")?,
                    dtod_bytes: u("dtod_bytes")?,
                    live_bytes: u("live")?,
                    peak_bytes: u("peak")?,
                };
                windows.extend(open.take());
                continue;
            }
            "launch" => EmulatedEvent::Launch {
                name: field_str(&v, "name", path, line)?,
                grid: dims(&v, "grid", path, line)?,
                block: dims(&v, "block", path, line)?,
                shared_bytes: u32::try_from(u("smem")?).map_err(|_| bad(path, line, "smem"))?,
            },
            "blas" => EmulatedEvent::Blas {
                routine: field_str(&v, "routine", path, line)?,
                m: u("m")?,
                n: u("n")?,
                k: u("k")?,
                batch: u("batch")?,
                a: field_str(&v, "a", path, line)?,
                c: field_str(&v, "c", path, line)?,
                compute: field_str(&v, "compute", path, line)?,
                math: field_str(&v, "math", path, line)?,
            },
            "sync" => EmulatedEvent::Sync { what: field_str(&v, "what", path, line)? },
            "copy" => EmulatedEvent::Copy {
                dir: match field_str(&v, "dir", path, line)?.as_str() {
                    "htod" => CopyDir::HostToDevice,
                    "dtoh" => CopyDir::DeviceToHost,
                    "dtod" => CopyDir::DeviceToDevice,
                    other => return Err(bad(path, line, format!("copy direction `{other}`"))),
                },
                bytes: u("bytes")?,
                blocking: v.get("blocking").and_then(Value::as_bool).ok_or_else(|| bad(path, line, "blocking"))?,
            },
            "memset" => EmulatedEvent::Memset { bytes: u("bytes")? },
            "alloc" => EmulatedEvent::Alloc { bytes: u("bytes")? },
            "free" => EmulatedEvent::Free { bytes: u("bytes")? },
            "graph_launch" => EmulatedEvent::GraphLaunch { nodes: u("nodes")? },
            other => return Err(bad(path, line, format!("unknown event `{other}`"))),
        };
        w.events.push(e);
        w.captured.push(v.get("captured").and_then(Value::as_bool).unwrap_or(false));
    }
    if open.is_some() {
        return Err(Error::format(Some(path), "the last window was never closed (no `stop` line)"));
    }
    Ok(windows)
}

/// What the emulator must have seen for a ledger event.
fn expected(e: &Event) -> EmulatedEvent {
    match &e.kind {
        EventKind::Launch { cost, grid, block, shared_bytes, .. } => EmulatedEvent::Launch {
            name: cost.kernel.to_string(),
            grid: *grid,
            block: *block,
            shared_bytes: *shared_bytes,
        },
        EventKind::Gemm { routine, m, n, k, batch, operands, output, compute, .. } => EmulatedEvent::Blas {
            routine: match (routine, *batch) {
                (BlasRoutine::Syrk, _) => "cublasSsyrk_v2",
                (BlasRoutine::Gemm, 1) => "cublasGemmEx",
                (BlasRoutine::Gemm, _) => "cublasGemmStridedBatchedEx",
            }
            .to_string(),
            m: *m,
            n: *n,
            k: *k,
            batch: *batch,
            a: operands.name().to_string(),
            c: output.name().to_string(),
            compute: match compute {
                GemmCompute::F32 => "32F",
                GemmCompute::F32FastTf32 => "32F_FAST_TF32",
            }
            .to_string(),
            math: "default".to_string(),
        },
        EventKind::Sync => EmulatedEvent::Sync { what: String::new() },
        EventKind::Copy { dir, bytes, blocking } => {
            EmulatedEvent::Copy { dir: *dir, bytes: *bytes, blocking: *blocking }
        }
        EventKind::Memset { bytes } => EmulatedEvent::Memset { bytes: *bytes },
        EventKind::Alloc { bytes } => EmulatedEvent::Alloc { bytes: *bytes },
        EventKind::Free { bytes } => EmulatedEvent::Free { bytes: *bytes },
        EventKind::GraphLaunch { nodes } => EmulatedEvent::GraphLaunch { nodes: *nodes },
    }
}

/// Holds the ledger of a window to the emulator's count of the same window: the same
/// events in the same order (kernel names and launch shapes; cuBLAS dimensions, types,
/// compute type and math mode; syncs; copies with their direction, size and blocking;
/// memsets; allocations and frees with their sizes), and totals that add up. The error
/// names the first event that differs.
pub fn check_against_ledger(ledger: &[Event], window: &EmulatedWindow) -> Result<()> {
    let n = ledger.len().max(window.events.len());
    for i in 0..n {
        let (l, w) = (ledger.get(i), window.events.get(i));
        let captured = window.captured.get(i).copied().unwrap_or(false);
        let ok = match (l, w) {
            (Some(l), Some(w)) => {
                l.captured == captured
                    && match (expected(l), w) {
                        // The ledger does not know which sync entry point ran; any sync matches.
                        (EmulatedEvent::Sync { .. }, EmulatedEvent::Sync { .. }) => true,
                        (want, got) => want == *got,
                    }
            }
            _ => false,
        };
        if !ok {
            return Err(Error::invalid(
                "perf::check_against_ledger",
                format!(
                    "event {i} differs: the library's ledger has {:?}{}, the emulated device saw {:?}{} \
                     ({} ledger events, {} emulated)",
                    l.map(expected),
                    if l.is_some_and(|l| l.captured) { " (captured)" } else { "" },
                    w,
                    if captured { " (captured)" } else { "" },
                    ledger.len(),
                    window.events.len()
                ),
            ));
        }
    }
    let t = &window.totals;
    // Totals count what ran now; captured events are counted apart.
    let ran = || window.events.iter().zip(&window.captured).filter(|(_, c)| !**c).map(|(e, _)| e);
    let count = |f: &dyn Fn(&EmulatedEvent) -> bool| ran().filter(|e| f(e)).count() as u64;
    let bytes = |d: CopyDir| {
        ran()
            .map(|e| match e {
                EmulatedEvent::Copy { dir, bytes, .. } if *dir == d => *bytes,
                _ => 0,
            })
            .sum::<u64>()
    };
    let sums = [
        ("launches", t.launches, count(&|e| matches!(e, EmulatedEvent::Launch { .. }))),
        ("cuBLAS calls", t.blas, count(&|e| matches!(e, EmulatedEvent::Blas { .. }))),
        ("syncs", t.syncs, count(&|e| matches!(e, EmulatedEvent::Sync { .. }))),
        ("blocking copies", t.blocking_copies, count(&|e| matches!(e, EmulatedEvent::Copy { blocking: true, .. }))),
        ("allocations", t.allocs, count(&|e| matches!(e, EmulatedEvent::Alloc { .. }))),
        ("graph launches", t.graph_launches, count(&|e| matches!(e, EmulatedEvent::GraphLaunch { .. }))),
        ("captured events", t.captured, window.captured.iter().filter(|c| **c).count() as u64),
        ("host-to-device bytes", t.htod_bytes, bytes(CopyDir::HostToDevice)),
        ("device-to-host bytes", t.dtoh_bytes, bytes(CopyDir::DeviceToHost)),
        ("device-to-device bytes", t.dtod_bytes, bytes(CopyDir::DeviceToDevice)),
    ];
    for (what, total, counted) in sums {
        if total != counted {
            return Err(Error::invalid(
                "perf::check_against_ledger",
                format!("the emulator's window total of {what} is {total}, its events add up to {counted}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::ElemType;

    #[test]
    fn reads_windows_and_rejects_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let lines = [
            r#"{"window":1,"ev":"start","live":100}"#,
            r#"{"window":1,"ev":"launch","name":"axpy_f32","grid":[2,1,1],"block":[256,1,1],"smem":0}"#,
            r#"{"window":1,"ev":"blas","routine":"cublasGemmEx","m":3,"n":4,"k":5,"batch":1,"a":"bf16","b":"bf16","c":"f32","compute":"32F","math":"default"}"#,
            r#"{"window":1,"ev":"copy","dir":"dtoh","bytes":8,"blocking":true}"#,
            r#"{"window":1,"ev":"sync","what":"stream"}"#,
            r#"{"window":1,"ev":"stop","launches":1,"blas":1,"syncs":1,"blocking_copies":1,"memsets":0,"allocs":0,"frees":0,"htod_bytes":0,"dtoh_bytes":8,"dtod_bytes":0,"graph_launches":0,"captured":0,"live":100,"peak":100}"#,
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let w = read_windows(&path).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].events.len(), 4);
        assert_eq!(w[0].totals.dtoh_bytes, 8);
        assert_eq!(w[0].start_live_bytes, 100);
        check_against_ledger(
            &[
                Event {
                    kind: EventKind::Launch {
                        cost: &crate::perf::shape::tests::TEST_KERNEL_AXPY,
                        grid: [2, 1, 1],
                        block: [256, 1, 1],
                        shared_bytes: 0,
                        args: vec![1],
                    },
                    tag: Default::default(),
                    gpu_ms: None,
                    captured: false,
                },
                Event {
                    kind: EventKind::Gemm {
                        routine: BlasRoutine::Gemm,
                        m: 3,
                        n: 4,
                        k: 5,
                        batch: 1,
                        operands: ElemType::Bf16,
                        output: ElemType::F32,
                        compute: GemmCompute::F32,
                        accumulate: false,
                    },
                    tag: Default::default(),
                    gpu_ms: None,
                    captured: false,
                },
                Event {
                    kind: EventKind::Copy { dir: CopyDir::DeviceToHost, bytes: 8, blocking: true },
                    tag: Default::default(),
                    gpu_ms: None,
                    captured: false,
                },
                Event { kind: EventKind::Sync, tag: Default::default(), gpu_ms: None, captured: false },
            ],
            &w[0],
        )
        .unwrap();
        // A ledger missing the sync is named at its index.
        let err = check_against_ledger(&[], &w[0]).unwrap_err().to_string();
        assert!(err.contains("event 0 differs"), "{err}");
        // An unclosed window, garbage, and an event outside a window are errors.
        std::fs::write(&path, lines[..3].join("\n")).unwrap();
        assert!(read_windows(&path).unwrap_err().to_string().contains("never closed"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(read_windows(&path).is_err());
        std::fs::write(&path, lines[1]).unwrap();
        assert!(read_windows(&path).unwrap_err().to_string().contains("outside any window"));
    }
}
