//! `sparsegrad basis`: streams every gradient stack `[N, out, in]` of the input files into
//! its group's Gram accumulator (a group = a tensor name; the same name in several files
//! accumulates), eigensolves each group and saves the [`BasisSet`].

use crate::args::{self, in_file, CliError, Opt};
use sparsegrad::io::{Dtype, SafetensorsFile};
use sparsegrad::{BasisSet, Error, GramAccumulator};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

const HELP: &str = "\
sparsegrad basis: compute the SparseGrad basis (P, Q) of each layer group

Usage:
  sparsegrad basis --grads GRADS.safetensors [--grads MORE.safetensors ...] --output BASIS.safetensors

Every tensor of every --grads file must be F32 of shape [N, out, in]: N gradients of the
layer group named by the tensor (e.g. `up_proj`; no control characters, not starting with
`__metadata__`). A name that appears in several files accumulates (its out and in must
agree), so gradients can be collected in pieces. A group whose gradients are all zero has
no basis and is an error.
Any other tensor is an error, not skipped: a skipped group would surface only later as a
missing basis.

Output (safetensors, written atomically): per group `{group}.P` [out, out],
`{group}.Q` [in, in] (orthogonal, columns by descending singular value),
`{group}.sigma_out` [out], `{group}.sigma_in` [in]; metadata `format` = sparsegrad-basis,
`version` = 1, `{group}.n_grads` = the number of gradients.

Memory: the Grams of every group are held together, 12 (out^2 + in^2) bytes per group,
plus about 28 n^2 bytes for the eigensolve of the larger side n; a run that would need
more than --max-memory is refused before anything is allocated.

Options:
  --grads FILE    input gradient stacks (repeatable, at least one)
  --output FILE   where to write the basis
  --max-memory GIB  refuse runs needing more (default 8)
  -h, --help      print this help
";

/// Default of `--max-memory`, in GiB.
const DEFAULT_MAX_MEMORY_GIB: f64 = 8.0;

/// The memory the groups will need, checked before any Gram is allocated: per group two
/// f64 Grams and their f32 scratch, `12 (out^2 + in^2)` bytes, all held together; plus,
/// one group at a time, the eigensolve of the larger side `n`: a copy of its Gram, the
/// `dsyevd` workspace (`1 + 6n + 2n^2` f64) and the f32 result, about `28 n^2` bytes.
struct MemoryBudget {
    limit_bytes: f64,
    grams: f64,
    eig_peak: f64,
}

impl MemoryBudget {
    fn admit(&mut self, group: &str, path: &std::path::Path, out: usize, inp: usize) -> Result<(), CliError> {
        let (o, i) = (out as f64, inp as f64);
        let grams = self.grams + 12.0 * (o * o + i * i);
        let n = o.max(i);
        let eig = self.eig_peak.max(28.0 * n * n + 8.0 * (6.0 * n + 1.0));
        if grams + eig > self.limit_bytes {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            return Err(in_file(
                path,
                Error::invalid(
                    "sparsegrad basis",
                    format!(
                        "group `{}` of [{out}, {inp}] gradients needs its {out} x {out} and {inp} x {inp} Gram matrices; with the groups before it the basis computation would need about {:.1} GiB, over the --max-memory limit of {:.1} GiB (raise it if the machine has the memory)",
                        sparsegrad::io::fs::escape(group, 200),
                        gib(grams + eig),
                        gib(self.limit_bytes)
                    ),
                ),
            ));
        }
        self.grams = grams;
        self.eig_peak = eig;
        Ok(())
    }
}

/// Values converted per chunk: 64 MiB of f32, so memory stays bounded by the Grams plus
/// this, however large the stacks are.
const CHUNK_VALUES: usize = 16 << 20;

pub fn run(argv: &[OsString]) -> Result<(), CliError> {
    let opts = [
        Opt { name: "grads", repeatable: true },
        Opt { name: "output", repeatable: false },
        Opt { name: "max-memory", repeatable: false },
    ];
    let parsed = args::parse("basis", argv, &opts)?;
    if parsed.help {
        crate::print_out(HELP);
        return Ok(());
    }
    let inputs = parsed.all("grads");
    if inputs.is_empty() {
        return Err(CliError::usage("missing required option `--grads` (try `sparsegrad basis --help`)"));
    }
    let output = parsed.required("basis", "output")?;
    let limit = match parsed.all("max-memory").first() {
        None => DEFAULT_MAX_MEMORY_GIB,
        Some(v) => {
            let text = v.to_string_lossy();
            match text.trim().parse::<f64>() {
                Ok(g) if g.is_finite() && g > 0.0 => g,
                _ => {
                    return Err(CliError::usage(format!(
                        "option `--max-memory`: `{}` is not a positive number of GiB",
                        sparsegrad::io::fs::escape(&text, 100)
                    )))
                }
            }
        }
    };
    let mut budget = MemoryBudget { limit_bytes: limit * (1u64 << 30) as f64, grams: 0.0, eig_peak: 0.0 };

    // Group name -> (accumulator, file that fixed its shape).
    let mut groups: BTreeMap<String, (GramAccumulator, PathBuf)> = BTreeMap::new();
    for path in &inputs {
        let file = SafetensorsFile::open(path)?;
        let names = file.names();
        if names.is_empty() {
            return Err(Error::Format {
                path: Some(path.clone()),
                msg: "holds no tensors (expected F32 gradient stacks [N, out, in])".into(),
            }
            .into());
        }
        for name in names {
            accumulate(&file, &name, &mut groups, &mut budget)?;
        }
    }

    let mut set = BasisSet::new();
    let mut summary = String::new();
    for (group, (acc, _)) in &groups {
        if acc.count() == 0 {
            return Err(CliError::from(Error::invalid(
                "sparsegrad basis",
                format!("group `{group}`: no gradients (every stack of it has N = 0)"),
            )));
        }
        let basis = acc.basis(group).map_err(|e| {
            let file = groups.get(group).map(|g| g.1.display().to_string()).unwrap_or_default();
            let msg = match e {
                Error::InvalidBasis { msg, .. } => msg,
                other => other.to_string(),
            };
            CliError::from(Error::InvalidBasis { group: group.clone(), msg: format!("(from {file}): {msg}") })
        })?;
        summary.push_str(&format!(
            "{group}: {} gradients of [{}, {}]\n",
            acc.count(),
            basis.shape().0,
            basis.shape().1
        ));
        set.insert(basis);
    }
    set.save(&output)?;
    crate::print_out(&format!("{summary}wrote {} group(s) to {}\n", groups.len(), output.display()));
    Ok(())
}

/// Checks one tensor and streams its gradients into its group.
fn accumulate(
    file: &SafetensorsFile,
    name: &str,
    groups: &mut BTreeMap<String, (GramAccumulator, PathBuf)>,
    budget: &mut MemoryBudget,
) -> Result<(), CliError> {
    let path = file.path();
    // The name is the group's: it becomes tensor names and a line of the summary.
    sparsegrad::basis::check_group_name(name).map_err(|e| in_file(path, e))?;
    let (Some(dtype), Some(shape)) = (file.dtype(name), file.shape(name)) else {
        return Err(in_file(path, Error::MissingTensor { name: name.into(), context: None }));
    };
    if dtype != Dtype::F32 {
        let expected = "F32 (a gradient stack [N, out, in])".to_string();
        return Err(in_file(path, Error::Dtype { name: name.into(), expected, got: format!("{dtype:?}") }));
    }
    let &[n, out, inp] = shape else {
        return Err(in_file(
            path,
            Error::Shape {
                op: "sparsegrad basis",
                what: format!("gradient stack `{name}`"),
                expected: "[N, out, in] (rank 3)".into(),
                got: format!("{shape:?}"),
            },
        ));
    };
    if out == 0 || inp == 0 {
        let e = Error::Shape {
            op: "sparsegrad basis",
            what: format!("gradient stack `{name}`"),
            expected: "out >= 1 and in >= 1".into(),
            got: format!("{shape:?}"),
        };
        return Err(in_file(path, e));
    }
    if !groups.contains_key(name) {
        budget.admit(name, path, out, inp)?;
    }
    let (acc, first) =
        groups.entry(name.to_string()).or_insert_with(|| (GramAccumulator::new(out, inp), path.to_path_buf()));
    if acc.shape() != (out, inp) {
        let (o, i) = acc.shape();
        return Err(in_file(
            path,
            Error::Shape {
                op: "sparsegrad basis",
                what: format!("gradient stack `{name}` (group shapes must agree across files)"),
                expected: format!("[N, {o}, {i}] as in {}", first.display()),
                got: format!("{shape:?}"),
            },
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let per = out * inp;
    let batch = (CHUNK_VALUES / per).max(1);
    match file.for_each_f32_chunk(name, batch * per, |chunk| acc.add_batch(chunk, chunk.len() / per)) {
        Ok(()) => Ok(()),
        // The accumulator saw one chunk; report the whole stack's count and first index.
        Err(Error::NonFinite { .. }) => {
            let (mut count, mut first_index, mut seen) = (0usize, usize::MAX, 0usize);
            file.for_each_f32_chunk(name, batch * per, |chunk| {
                for (i, v) in chunk.iter().enumerate() {
                    if !v.is_finite() {
                        count += 1;
                        first_index = first_index.min(seen + i);
                    }
                }
                seen += chunk.len();
                Ok(())
            })
            .map_err(|e| in_file(path, e))?;
            Err(in_file(path, Error::NonFinite { what: format!("gradient stack `{name}`"), count, first_index }))
        }
        Err(e) => Err(in_file(path, e)),
    }
}
