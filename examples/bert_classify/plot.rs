//! PNG charts with plotters (text through its pure-Rust ab_glyph path, DejaVu Sans from
//! `fonts-dejavu-core`; without the font the chart is drawn without text, after a warning).

use plotters::prelude::*;
use plotters::style::register_font;
use sparsegrad::{Error, Result};
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";

pub const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// `(x, y, error bar half width)`.
pub type Point = (f64, f64, f64);

/// One line: label, colour, points.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub points: &'a [Point],
}

fn have_font() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let ok = std::fs::read(FONT_PATH).ok().is_some_and(|bytes| {
            // plotters keeps fonts for the whole process; this runs once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
        });
        if !ok {
            eprintln!("warning: no usable font at {FONT_PATH} (install fonts-dejavu-core); charts have no text");
        }
        ok
    })
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::other(format!("cannot draw the chart: {e}")))
}

/// Draws `series` into a PNG at `path`; `log_x` puts x on a log10 scale.
pub fn chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series<'_>], log_x: bool) -> Result<()> {
    let tx = |x: f64| if log_x { x.max(1e-12).log10() } else { x };
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (x0, x1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(tx(p.0)), b.max(tx(p.0))));
    let (y0, y1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1 - p.2), b.max(p.1 + p.2)));
    let (x0, x1) = if x0.is_finite() && x1 > x0 { (x0, x1) } else { (x0.min(0.0), x0.max(0.0) + 1.0) };
    let (y0, y1) = if y0.is_finite() && y1 > y0 { (y0, y1) } else { (0.0, 1.0) };
    let (px, py) = ((x1 - x0) * 0.05, (y1 - y0) * 0.08 + 1e-3);
    let text = have_font();
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if text {
        b.caption(title, (FAMILY, 22)).x_label_area_size(45).y_label_area_size(65);
    }
    let mut c = b.build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py)).map_err(|e| err(path, e))?;
    let mut mesh = c.configure_mesh();
    if text {
        let xd = if log_x { format!("{x_desc} (log10)") } else { x_desc.to_string() };
        mesh.x_desc(xd).y_desc(y_desc).label_style((FAMILY, 15));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(path, e))?;
    for s in series {
        let color = s.color.to_rgba();
        let p: Vec<(f64, f64, f64)> = s.points.iter().map(|&(x, y, e)| (tx(x), y, e)).collect();
        let line = c
            .draw_series(LineSeries::new(p.iter().map(|q| (q.0, q.1)), color.stroke_width(2)))
            .map_err(|e| err(path, e))?;
        if text {
            line.label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        c.draw_series(p.iter().map(|q| Circle::new((q.0, q.1), 4, color.filled()))).map_err(|e| err(path, e))?;
        c.draw_series(
            p.iter().filter(|q| q.2 > 0.0).map(|q| PathElement::new(vec![(q.0, q.1 - q.2), (q.0, q.1 + q.2)], color)),
        )
        .map_err(|e| err(path, e))?;
    }
    if text {
        c.configure_series_labels()
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(path, e))?;
    }
    root.present().map_err(|e| err(path, e))
}
