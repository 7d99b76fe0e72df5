//! Annotated images: the input image with the detections drawn on it, for a person to check a
//! count at a glance.
//!
//! * Counted cells (score ≥ threshold): a solid box in the class colour ([`class_colour`],
//!   Okabe–Ito) and a label `CLASS 0.93` on a tab of that colour above the box; below it (or
//!   inside its top edge) when above would leave the image or cover the legend or a more
//!   confident cell's label. A class named like `White Blood Cell (WBC)` is labelled with its
//!   abbreviation `WBC`.
//! * Detections below the threshold: a thin dashed, slightly transparent box in the class colour,
//!   no label.
//! * Tiled images: the boundaries between the fields' owned cores (where a cell changes owner,
//!   see [`super::tiling`]) as faint dark lines.
//! * A legend in the top-left corner on a semi-opaque dark panel: each class's colour, name,
//!   count and share, the total, the threshold, the number of detections below it, the fields
//!   (when tiled) and [`NOTICE`]. Class names are abbreviated there too when the full names
//!   would make the panel wider than ~45 % of the image.
//!
//! Line widths and text size scale with the image's longer side: boxes are 2 px up to 1500 px,
//! 3 px up to 2100 px, …; text has 7 px capitals up to 960 px, 14 px up to 1600 px, …. Everything
//! is clipped to the image, so boxes on or past the edges are fine.

use std::path::{Path, PathBuf};

#[path = "font.rs"]
pub mod font;

use super::document::NOTICE;
use super::report::{class_colour, create_dir, file_stem};
use super::{tiling, ImageCount, ModelInfo};
use crate::error::{Error, Result};
use crate::image_io::Rgb8;

/// Text and legend panel colours.
const TEXT: [u8; 3] = [245, 245, 245];
const TEXT_DIM: [u8; 3] = [175, 175, 175];
const PANEL: [u8; 3] = [20, 20, 24];
const PANEL_ALPHA: f32 = 0.85;
/// Field boundaries: dark, faint.
const GRID: [u8; 3] = [0, 0, 0];
const GRID_ALPHA: f32 = 0.3;
/// Boxes below the threshold are drawn at this opacity (they are not part of the count).
const UNCOUNTED_ALPHA: f32 = 0.8;

/// A clipped drawing surface over an [`Rgb8`]'s pixels.
struct Canvas<'a> {
    w: i64,
    h: i64,
    data: &'a mut [u8],
}

impl Canvas<'_> {
    fn new(img: &mut Rgb8) -> Canvas<'_> {
        Canvas {
            w: img.width as i64,
            h: img.height as i64,
            data: &mut img.data,
        }
    }

    /// Blends `c` over pixel (x, y) with opacity `alpha`; pixels outside the image are skipped.
    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= self.w || y >= self.h {
            return;
        }
        let i = ((y * self.w + x) * 3) as usize;
        let Some(px) = self.data.get_mut(i..i + 3) else {
            return;
        };
        if alpha >= 1.0 {
            px.copy_from_slice(&c);
        } else {
            for (p, c) in px.iter_mut().zip(c) {
                *p = (*p as f32 * (1.0 - alpha) + c as f32 * alpha).round() as u8;
            }
        }
    }

    /// Fills the inclusive rectangle [x0, x1] × [y0, y1], clipped to the image.
    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3], alpha: f32) {
        let (x0, x1) = (x0.max(0), x1.min(self.w - 1));
        let (y0, y1) = (y0.max(0), y1.min(self.h - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.blend(x, y, c, alpha);
            }
        }
    }

    fn text(&mut self, text: &str, x: i64, y: i64, scale: u32, c: [u8; 3]) {
        font::render(text, x, y, scale, |px, py| self.blend(px, py, c, 1.0));
    }
}

/// Sizes derived from the image size.
#[derive(Debug, Clone, Copy)]
struct Style {
    /// Font scale (font pixels → image pixels).
    scale: u32,
    /// Counted boxes' line width.
    thick: i64,
    /// Uncounted boxes' and the grid's line width.
    thin: i64,
}

impl Style {
    fn for_size(width: u32, height: u32) -> Style {
        let m = width.max(height) as f32;
        let thick = ((m / 600.0).round() as i64).clamp(2, 12);
        Style {
            scale: ((m / 640.0).round() as u32).clamp(1, 12),
            thick,
            thin: (thick / 2).max(1),
        }
    }
}

/// A box in whole pixels: the first and last pixel columns and rows it covers (inclusive).
#[derive(Debug, Clone, Copy)]
struct PxBox {
    l: i64,
    t: i64,
    r: i64,
    b: i64,
}

impl PxBox {
    /// `None` for a box with a non-finite coordinate. Coordinates far outside any image are
    /// clamped so that the loops stay short after clipping.
    fn from_bbox(b: &[f32; 4]) -> Option<PxBox> {
        if !b.iter().all(|v| v.is_finite()) {
            return None;
        }
        let c = |v: f32| v.clamp(-1.0e6, 1.0e6);
        let (l, t) = (c(b[0]).floor() as i64, c(b[1]).floor() as i64);
        let (r, bo) = (c(b[2]).ceil() as i64 - 1, c(b[3]).ceil() as i64 - 1);
        Some(PxBox {
            l,
            t,
            r: r.max(l),
            b: bo.max(t),
        })
    }
}

/// A solid outline of width `w`, centred on the box's edge pixels (the edge pixel itself is
/// always inked).
fn solid_box(cv: &mut Canvas, bx: PxBox, w: i64, c: [u8; 3], alpha: f32) {
    let lo = w / 2; // pixels outside the edge pixel
    let hi = w - 1 - lo; // pixels inside it
    let (ol, ot, or, ob) = (bx.l - lo, bx.t - lo, bx.r + lo, bx.b + lo);
    cv.fill(ol, ot, or, bx.t + hi, c, alpha); // top
    cv.fill(ol, bx.b - hi, or, ob, c, alpha); // bottom
    cv.fill(ol, bx.t + hi + 1, bx.l + hi, bx.b - hi - 1, c, alpha); // left
    cv.fill(bx.r - hi, bx.t + hi + 1, or, bx.b - hi - 1, c, alpha); // right
}

/// A dashed outline of width `w`: dashes of 4w with gaps of 3w, each edge starting with a dash
/// at its corner.
fn dashed_box(cv: &mut Canvas, bx: PxBox, w: i64, c: [u8; 3], alpha: f32) {
    let (dash, period) = (4 * w, 7 * w);
    let lo = w / 2;
    let square = |cv: &mut Canvas, x: i64, y: i64| {
        cv.fill(x - lo, y - lo, x - lo + w - 1, y - lo + w - 1, c, alpha)
    };
    // Walk only the visible part of each edge; the phase stays tied to the corner.
    let (x0, x1) = (bx.l.max(-w), bx.r.min(cv.w + w));
    for x in x0..=x1 {
        if (x - bx.l) % period < dash || x == bx.r {
            square(cv, x, bx.t);
            square(cv, x, bx.b);
        }
    }
    let (y0, y1) = (bx.t.max(-w), bx.b.min(cv.h + w));
    for y in y0..=y1 {
        if (y - bx.t) % period < dash || y == bx.b {
            square(cv, bx.l, y);
            square(cv, bx.r, y);
        }
    }
}

/// Black or white, whichever reads better on `bg`.
fn ink_on(bg: [u8; 3]) -> [u8; 3] {
    let l = 0.299 * bg[0] as f32 + 0.587 * bg[1] as f32 + 0.114 * bg[2] as f32;
    if l > 140.0 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    }
}

/// The name on box labels: the abbreviation in trailing parentheses (`White Blood Cell (WBC)` →
/// `WBC`), else the name itself, at most 16 characters.
pub fn short_name(class: &str) -> String {
    let t = class.trim();
    if let Some(inner) = t
        .strip_suffix(')')
        .and_then(|s| s.rfind('(').map(|i| s[i + 1..].trim()))
        .filter(|s| !s.is_empty())
    {
        return inner.chars().take(16).collect();
    }
    t.chars().take(16).collect()
}

/// `0.7` → `0.70`, `0.725` → `0.725`.
fn fmt_threshold(t: f32) -> String {
    let s = format!("{t:.3}");
    match s.strip_suffix('0') {
        Some(s2) => s2.to_string(),
        None => s,
    }
}

/// An inclusive pixel rectangle [x0, x1] × [y0, y1].
#[derive(Debug, Clone, Copy)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn overlaps(&self, o: &Rect) -> bool {
        self.x0 <= o.x1 && o.x0 <= self.x1 && self.y0 <= o.y1 && o.y0 <= self.y1
    }
}

/// A label tab to draw: its rectangle, text and colour.
struct Label {
    rect: Rect,
    text: String,
    bg: [u8; 3],
}

/// Places the label tab `text` for the box `bx` outlined `thick` pixels wide: above the box,
/// or, when that is off the image or over the legend or an earlier label (`avoid`), below it,
/// or else inside its top edge. Kept inside the image horizontally.
fn place_label(cv: &Canvas, text: &str, bx: PxBox, thick: i64, s: u32, avoid: &[Rect]) -> Rect {
    let si = s as i64;
    let w = font::text_width(text, s) as i64 + 4 * si;
    let h = (font::HEIGHT as i64 + 3) * si;
    let lo = thick / 2;
    let x0 = (bx.l - lo).min(cv.w - w).max(0);
    let above = bx.t - lo - h;
    let below = bx.b + lo + 1;
    let inside = bx.t - lo + thick;
    let rect = |y0: i64| Rect {
        x0,
        y0,
        x1: x0 + w - 1,
        y1: y0 + h - 1,
    };
    let fits = |y0: i64| y0 >= 0 && y0 + h <= cv.h && !avoid.iter().any(|a| rect(y0).overlaps(a));
    let y0 = [above, below, inside]
        .into_iter()
        .find(|&y| fits(y))
        .unwrap_or(if above >= 0 { above } else { inside });
    rect(y0)
}

fn draw_label(cv: &mut Canvas, l: &Label, s: u32) {
    let r = l.rect;
    let si = s as i64;
    cv.fill(r.x0, r.y0, r.x1, r.y1, l.bg, 1.0);
    cv.text(&l.text, r.x0 + 2 * si, r.y0 + 2 * si, s, ink_on(l.bg));
}

/// Draws the faint boundaries between the fields' cores of a tiled image.
fn field_grid(cv: &mut Canvas, tiles: &super::TileInfo, w: u32, h: u32, line: i64) {
    let Ok(fields) = tiling::fields(w, h, tiles.field, tiles.overlap) else {
        return;
    };
    let mut xs: Vec<i64> = Vec::new();
    let mut ys: Vec<i64> = Vec::new();
    for f in &fields {
        if f.core[0].is_finite() {
            xs.push(f.core[0].round() as i64);
        }
        if f.core[1].is_finite() {
            ys.push(f.core[1].round() as i64);
        }
    }
    xs.sort_unstable();
    xs.dedup();
    ys.sort_unstable();
    ys.dedup();
    let lo = line / 2;
    for x in xs {
        cv.fill(x - lo, 0, x - lo + line - 1, cv.h - 1, GRID, GRID_ALPHA);
    }
    for y in ys {
        cv.fill(0, y - lo, cv.w - 1, y - lo + line - 1, GRID, GRID_ALPHA);
    }
}

/// One legend row's sample in the swatch column.
enum Sample {
    Colour([u8; 3]),
    SolidLine,
    DashedLine,
    GridLine,
    /// Nothing, text aligned with the other rows' text.
    None,
    /// Nothing, text starting at the sample column.
    Unindented,
}

struct Row {
    sample: Sample,
    /// Name column (or the whole text when `count` is `None`).
    name: String,
    count: Option<String>,
    percent: Option<String>,
    colour: [u8; 3],
    /// Draw a separator line above this row.
    rule: bool,
}

impl Row {
    fn text(sample: Sample, text: String, colour: [u8; 3], rule: bool) -> Row {
        Row {
            sample,
            name: text,
            count: None,
            percent: None,
            colour,
            rule,
        }
    }
}

/// The legend's column widths in pixels.
struct Columns {
    swatch: i64,
    gap: i64,
    name: i64,
    count: i64,
    percent: i64,
    /// Width of the widest row.
    inner: i64,
}

impl Columns {
    fn of(rows: &[Row], st: Style) -> Columns {
        let s = st.scale as i64;
        let tw = |t: &str| font::text_width(t, st.scale) as i64;
        let (swatch, gap) = (2 * font::CAP_HEIGHT as i64 * s, 4 * s);
        let table = rows.iter().filter(|r| r.count.is_some());
        let name = table.clone().map(|r| tw(&r.name)).max().unwrap_or(0);
        let count = table
            .clone()
            .filter_map(|r| r.count.as_deref().map(tw))
            .max()
            .unwrap_or(0);
        let percent = table
            .filter_map(|r| r.percent.as_deref().map(tw))
            .max()
            .unwrap_or(0);
        let table_w =
            swatch + gap + name + 3 * gap + count + (percent > 0) as i64 * (2 * gap + percent);
        let free_w = rows
            .iter()
            .filter(|r| r.count.is_none())
            .map(|r| match r.sample {
                Sample::Unindented => tw(&r.name),
                _ => swatch + gap + tw(&r.name),
            })
            .max()
            .unwrap_or(0);
        Columns {
            swatch,
            gap,
            name,
            count,
            percent,
            inner: table_w.max(free_w),
        }
    }
}

/// Legend panel margin and padding.
fn legend_pad(st: Style) -> i64 {
    5 * st.scale as i64
}

/// Where the legend panel of `rows` goes: the top-left corner.
fn legend_rect(rows: &[Row], st: Style) -> Rect {
    let s = st.scale as i64;
    let pad = legend_pad(st);
    let line = (font::HEIGHT as i64 + 3) * s;
    let rules = rows.iter().filter(|r| r.rule).count() as i64;
    let w = Columns::of(rows, st).inner + 2 * pad;
    let h = rows.len() as i64 * line + rules * (2 * s) + 2 * pad - 2 * s;
    Rect {
        x0: pad,
        y0: pad,
        x1: pad + w - 1,
        y1: pad + h - 1,
    }
}

fn legend(cv: &mut Canvas, rows: &[Row], st: Style) {
    let s = st.scale as i64;
    let su = st.scale;
    let tw = |t: &str| font::text_width(t, su) as i64;
    let pad = legend_pad(st);
    let line = (font::HEIGHT as i64 + 3) * s;
    let Columns {
        swatch,
        gap,
        name: name_w,
        count: count_w,
        percent: pct_w,
        inner: inner_w,
    } = Columns::of(rows, st);
    let panel = legend_rect(rows, st);
    let (x0, y0) = (panel.x0, panel.y0);
    cv.fill(panel.x0, panel.y0, panel.x1, panel.y1, PANEL, PANEL_ALPHA);

    let mut y = y0 + pad;
    let x = x0 + pad;
    for row in rows {
        if row.rule {
            cv.fill(
                x,
                y - s,
                x + inner_w - 1,
                y - s + (s / 2).max(1) - 1,
                TEXT_DIM,
                0.6,
            );
            y += 2 * s;
        }
        // Samples are as tall as the capitals and twice as wide: a bar of the class colour, or a
        // line drawn like the boxes (solid, dashed) or the field grid.
        let (x1, y1) = (x + swatch - 1, y + font::CAP_HEIGHT as i64 * s - 1);
        let line_at = |w: i64| (y + y1) / 2 - w / 2;
        match row.sample {
            Sample::Colour(c) => cv.fill(x, y, x1, y1, c, 1.0),
            Sample::SolidLine => {
                let ly = line_at(st.thick);
                cv.fill(x, ly, x1, ly + st.thick - 1, TEXT, 1.0);
            }
            Sample::DashedLine => {
                // Three dashes and two gaps across the sample.
                let ly = line_at(st.thin);
                for i in 0..swatch {
                    if (i * 5 / swatch) % 2 == 0 {
                        cv.fill(x + i, ly, x + i, ly + st.thin - 1, TEXT, 1.0);
                    }
                }
            }
            Sample::GridLine => {
                let ly = line_at(st.thin);
                cv.fill(x, ly, x1, ly + st.thin - 1, TEXT_DIM, 1.0);
            }
            Sample::None | Sample::Unindented => {}
        }
        let tx = match row.sample {
            Sample::Unindented => x,
            _ => x + swatch + gap,
        };
        cv.text(&row.name, tx, y, su, row.colour);
        if let Some(count) = &row.count {
            let cx = tx + name_w + 3 * gap + count_w - tw(count);
            cv.text(count, cx, y, su, row.colour);
            if let Some(p) = &row.percent {
                let px = tx + name_w + 3 * gap + count_w + 2 * gap + pct_w - tw(p);
                cv.text(p, px, y, su, TEXT_DIM);
            }
        }
        y += line;
    }
}

/// The legend's rows: per class its colour, name (`short`: [`short_name`]), count and share of the
/// counted cells; the total; the threshold; detections below it; the fields; [`NOTICE`].
fn legend_rows(
    model: &ModelInfo,
    detections: &[super::Cell],
    threshold: f32,
    tiles: Option<&super::TileInfo>,
    short: bool,
) -> Vec<Row> {
    let mut counts = vec![0usize; model.classes.len()];
    let mut below = 0usize;
    for d in detections {
        if is_counted(d, threshold) {
            if let Some(n) = counts.get_mut(d.label - 1) {
                *n += 1;
            }
        } else if is_near(d, threshold) {
            below += 1;
        }
    }
    let total: usize = counts.iter().sum();
    let mut rows: Vec<Row> = model
        .classes
        .iter()
        .zip(&counts)
        .enumerate()
        .map(|(i, (name, &n))| Row {
            sample: Sample::Colour(class_colour(i + 1)),
            name: if short {
                short_name(name)
            } else {
                name.clone()
            },
            count: Some(n.to_string()),
            percent: Some(if total > 0 {
                format!("{:.1}%", 100.0 * n as f64 / total as f64)
            } else {
                "-".into()
            }),
            colour: TEXT,
            rule: false,
        })
        .collect();
    rows.push(Row {
        sample: Sample::None,
        name: "Total".into(),
        count: Some(total.to_string()),
        percent: None,
        colour: TEXT,
        rule: true,
    });
    let near = fmt_threshold(NEAR_FRACTION * threshold);
    let threshold = fmt_threshold(threshold);
    rows.push(Row::text(
        Sample::SolidLine,
        format!("Counted: score ≥ {threshold}"),
        TEXT,
        true,
    ));
    rows.push(Row::text(
        Sample::DashedLine,
        format!("Below, ≥ {near}: {below}"),
        TEXT,
        false,
    ));
    if let Some(t) = tiles {
        rows.push(Row::text(
            Sample::GridLine,
            format!("{} fields of {} px", t.fields, t.field),
            TEXT,
            false,
        ));
    }
    for (i, part) in NOTICE.split_inclusive(". ").enumerate() {
        let part = part.trim().to_string();
        rows.push(Row::text(Sample::Unindented, part, TEXT_DIM, i == 0));
    }
    rows
}

/// The counting rule of [`super::image_count`].
/// Uncounted detections are drawn (dashed) only from this fraction of the counting threshold up:
/// a reviewer wants the near misses, not the detector's long tail of low scores down to 0.05,
/// which buries the image. Every detection is still in the JSON and COCO outputs.
pub const NEAR_FRACTION: f32 = 0.5;

fn is_near(d: &super::Cell, threshold: f32) -> bool {
    d.score >= NEAR_FRACTION * threshold
}

fn is_counted(d: &super::Cell, threshold: f32) -> bool {
    d.score >= threshold && d.label >= 1
}

/// The image with `result`'s detections, the field grid (if tiled) and a legend drawn on it (see
/// the module documentation). `image` must be the image `result` was counted on; boxes are in its
/// pixels.
///
/// A detection is drawn as counted when its score is ≥ `threshold` (the rule of
/// [`super::image_count`]), and the legend's counts are those of the drawn boxes; with the
/// threshold of the run they equal `result.counts`.
pub fn annotate(image: &Rgb8, result: &ImageCount, model: &ModelInfo, threshold: f32) -> Rgb8 {
    let mut out = image.clone();
    let st = Style::for_size(image.width, image.height);
    let mut cv = Canvas::new(&mut out);
    let counted = |d: &super::Cell| is_counted(d, threshold);

    if let Some(tiles) = &result.tiles {
        field_grid(&mut cv, tiles, image.width, image.height, st.thin);
    }
    // Uncounted first, then counted from the lowest score up, so that confident boxes are on top.
    let mut order: Vec<&super::Cell> = result.detections.iter().collect();
    order.sort_by(|a, b| {
        (counted(a), a.score)
            .partial_cmp(&(counted(b), b.score))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for d in &order {
        let Some(bx) = PxBox::from_bbox(&d.bbox) else {
            continue;
        };
        if counted(d) {
            solid_box(&mut cv, bx, st.thick, class_colour(d.label), 1.0);
        } else if is_near(d, threshold) {
            dashed_box(&mut cv, bx, st.thin, class_colour(d.label), UNCOUNTED_ALPHA);
        }
    }
    // The legend: full class names, or their abbreviations when it would cover too much of a
    // small image. Labels keep out of its way.
    let mut rows = legend_rows(
        model,
        &result.detections,
        threshold,
        result.tiles.as_ref(),
        false,
    );
    if Columns::of(&rows, st).inner + 4 * legend_pad(st) > image.width as i64 * 45 / 100 {
        rows = legend_rows(
            model,
            &result.detections,
            threshold,
            result.tiles.as_ref(),
            true,
        );
    }
    let panel = legend_rect(&rows, st);
    // Labels after all boxes, so that no box line crosses a label. The most confident cells
    // choose their place first and are drawn last (on top where labels must overlap).
    let mut taken = vec![panel];
    let mut labels: Vec<Label> = Vec::new();
    for d in order.iter().rev().filter(|d| counted(d)) {
        let Some(bx) = PxBox::from_bbox(&d.bbox) else {
            continue;
        };
        let text = format!("{} {:.2}", short_name(&d.class), d.score);
        let rect = place_label(&cv, &text, bx, st.thick, st.scale, &taken);
        taken.push(rect);
        labels.push(Label {
            rect,
            text,
            bg: class_colour(d.label),
        });
    }
    for l in labels.iter().rev() {
        draw_label(&mut cv, l, st.scale);
    }
    legend(&mut cv, &rows, st);
    out
}

/// Annotates `image` ([`annotate`]) and writes it into `dir` (created if missing) as
/// `<stem>.annotated.png`, the stem being `result.file`'s file stem. Returns the file written.
///
/// In a batch, where two inputs may share a stem, use [`write_annotated_as`] with the stems of
/// [`super::report::output_stems`] over the whole input list (the names the GeoJSON files get).
pub fn write_annotated(
    dir: &Path,
    image: &Rgb8,
    result: &ImageCount,
    model: &ModelInfo,
    threshold: f32,
) -> Result<PathBuf> {
    write_annotated_as(
        dir,
        &file_stem(&result.file),
        image,
        result,
        model,
        threshold,
    )
}

/// [`write_annotated`] with the output stem given: writes `dir/<stem>.annotated.png`.
pub fn write_annotated_as(
    dir: &Path,
    stem: &str,
    image: &Rgb8,
    result: &ImageCount,
    model: &ModelInfo,
    threshold: f32,
) -> Result<PathBuf> {
    let path = dir.join(format!("{stem}.annotated.png"));
    if (image.width, image.height) != (result.width, result.height) {
        return Err(Error::Invalid(format!(
            "{}: the image is {}×{} but {} was counted at {}×{}",
            path.display(),
            image.width,
            image.height,
            result.file,
            result.width,
            result.height
        )));
    }
    if image.data.len() != image.width as usize * image.height as usize * 3 {
        return Err(Error::Invalid(format!(
            "{}: {} bytes of pixel data for a {}×{} RGB image",
            path.display(),
            image.data.len(),
            image.width,
            image.height
        )));
    }
    create_dir(dir)?;
    let out = annotate(image, result, model, threshold);
    image::save_buffer_with_format(
        &path,
        &out.data,
        out.width,
        out.height,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| match e {
        image::ImageError::IoError(source) => Error::Io {
            path: path.clone(),
            source,
        },
        other => Error::Invalid(format!("{}: cannot write PNG: {other}", path.display())),
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(short_name("White Blood Cell (WBC)"), "WBC");
        assert_eq!(short_name("Platelet"), "Platelet");
        assert_eq!(short_name("odd ()"), "odd ()");
        assert_eq!(
            short_name("a very long class name indeed"),
            "a very long clas"
        );
    }

    #[test]
    fn thresholds_print_short() {
        assert_eq!(fmt_threshold(0.7), "0.70");
        assert_eq!(fmt_threshold(0.725), "0.725");
        assert_eq!(fmt_threshold(1.0), "1.00");
    }

    #[test]
    fn style_scales_with_size() {
        let small = Style::for_size(575, 575);
        assert_eq!((small.scale, small.thick, small.thin), (1, 2, 1));
        let big = Style::for_size(2560, 1920);
        assert!(big.scale >= 3 && big.thick >= 3);
    }
}
