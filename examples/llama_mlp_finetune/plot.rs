//! Loss curves as PNG with plotters, rendering text with its pure-Rust ab_glyph path
//! (no fontconfig or freetype to install). DejaVu Sans is registered at run time from the
//! system fonts (Debian/Ubuntu package `fonts-dejavu-core`); without it the plot is still
//! drawn, only without any text, and one warning is printed.

use plotters::prelude::*;
use plotters::style::register_font;
use sparsegrad::{Error, Result};
use std::path::Path;
use std::sync::OnceLock;

/// Where `fonts-dejavu-core` puts the font.
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";

/// One curve: a label, a colour, its points, and whether to mark each point (sparse
/// curves such as validation losses read better with markers).
pub struct Curve<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub points: &'a [(usize, f64)],
    pub markers: bool,
    /// Drawn pale, behind the others (raw per-batch losses under their running mean).
    pub faint: bool,
}

/// The mean of each point's last `window` values (fewer at the start): the trend of a
/// noisy per-batch loss.
pub fn running_mean(points: &[(usize, f64)], window: usize) -> Vec<(usize, f64)> {
    (0..points.len())
        .map(|i| {
            let w = &points[(i + 1).saturating_sub(window.max(1))..=i];
            (points[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect()
}

pub const PALETTE: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];

/// Registers the font once per process; false (after one warning) when it is missing.
fn have_font() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let registered = std::fs::read(FONT_PATH).ok().is_some_and(|bytes| {
            // plotters keeps fonts for the whole process, hence the 'static it asks for;
            // this runs once, so the leak is one font file.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
        });
        if !registered {
            eprintln!(
                "warning: no usable font at {FONT_PATH} (install fonts-dejavu-core); plots are drawn without text"
            );
        }
        registered
    })
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::other(format!("cannot draw the plot: {e}")))
}

/// Draws `curves` (x: step, y: loss) into a PNG at `path`, written like every other
/// output through `write_atomic` (plotters would write the path in place, replacing a
/// FIFO or a symlink): drawn into a temp file of our own beside it, then copied over.
pub fn plot(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-plot-{}.png", std::process::id()));
    let drawn = draw(&tmp, title, curves).and_then(|()| std::fs::read(&tmp).map_err(|e| Error::io(path, e)));
    let _ = std::fs::remove_file(&tmp);
    let bytes = drawn?;
    sparsegrad::io::fs::write_atomic(path, |w| w.write_all(&bytes))
}

fn draw(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<()> {
    let finite = || curves.iter().flat_map(|c| c.points.iter()).filter(|p| p.1.is_finite());
    let x_max = finite().map(|p| p.0).max().unwrap_or(1).max(1) as i64;
    let (lo, hi) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(1e-3);
    let text = have_font();
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder.caption(title, (FAMILY, 24)).x_label_area_size(45).y_label_area_size(65);
    }
    let mut chart = builder.build_cartesian_2d(0i64..x_max, (lo - pad)..(hi + pad)).map_err(|e| draw_err(path, e))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if text {
        mesh.x_desc("step").y_desc("loss (nats/token)").label_style((FAMILY, 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| draw_err(path, e))?;
    for c in curves {
        let pts: Vec<(i64, f64)> = c.points.iter().filter(|p| p.1.is_finite()).map(|&(s, l)| (s as i64, l)).collect();
        let color = if c.faint { c.color.mix(0.35) } else { c.color.to_rgba() };
        let series = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(path, e))?;
        if text {
            series
                .label(c.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if c.markers {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| draw_err(path, e))?;
        }
    }
    if text {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))
}
