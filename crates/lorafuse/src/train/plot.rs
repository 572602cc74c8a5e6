//! The loss-curve PNG: train loss per step and validation loss, drawn with plotters' bitmap
//! backend and encoded with `png`.
//!
//! Labels use a built-in 5x7 pixel font rather than plotters' text support, which needs either
//! system fonts (absent on a bare machine or in CI) or an embedded TTF of several hundred KB;
//! plotters' font-less build panics when asked to draw text, so no plotters text call is made.

use crate::{Error, Result};
use plotters::prelude::*;

/// The plot's file name in the adapter folder.
pub const PLOT_FILE: &str = "loss.png";

const W: u32 = 800;
const H: u32 = 480;
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VAL_COLOR: RGBColor = RGBColor(255, 127, 14);
const AXIS_COLOR: RGBColor = RGBColor(60, 60, 60);
const GRID_COLOR: RGBColor = RGBColor(225, 225, 225);

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("drawing the loss plot: {e}"))
}

/// Rows of a 5x7 glyph, top to bottom, bit 4 the leftmost pixel.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        _ => [0; 7],
    }
}

const SCALE: i32 = 2;
const ADVANCE: i32 = 6 * SCALE;

fn text_width(s: &str) -> i32 {
    s.chars().count() as i32 * ADVANCE - SCALE
}

/// Draws `s` with its top-left corner at `(x, y)` in pixels.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    s: &str,
    (x, y): (i32, i32),
    color: &RGBColor,
) -> Result<()> {
    for (i, c) in s.chars().enumerate() {
        let x0 = x + i as i32 * ADVANCE;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                let (px, py) = (x0 + col * SCALE, y + row as i32 * SCALE);
                area.draw(&Rectangle::new(
                    [(px, py), (px + SCALE - 1, py + SCALE - 1)],
                    color.filled(),
                ))
                .map_err(plot_err)?;
            }
        }
    }
    Ok(())
}

/// Round tick positions covering `[lo, hi]`: steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut t = first;
    while t <= hi + step * 1e-9 {
        out.push(t);
        t += step;
    }
    (out, step)
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// The PNG bytes of the loss curve: `train` as a line, `val` as a line with square markers.
pub fn loss_png(train: &[(usize, f64)], val: &[(usize, f64)]) -> Result<Vec<u8>> {
    let mut buf = vec![255u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw_chart(&root, train, val)?;
        root.present().map_err(plot_err)?;
    }
    let mut png_bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut png_bytes, W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(plot_err)?;
    writer.write_image_data(&buf).map_err(plot_err)?;
    writer.finish().map_err(plot_err)?;
    Ok(png_bytes)
}

fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    train: &[(usize, f64)],
    val: &[(usize, f64)],
) -> Result<()> {
    let finite = |p: &&(usize, f64)| p.1.is_finite();
    let all: Vec<(usize, f64)> = train.iter().chain(val).filter(finite).copied().collect();
    if all.is_empty() {
        return draw_text(root, "no loss", (20, 20), &AXIS_COLOR);
    }
    let x_max = all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let (mut y_lo, mut y_hi) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
    y_lo = (y_lo - pad).max(0.0);
    y_hi += pad;
    let (left, right, top, bottom) = (80, 20, 40, 50);
    let mut chart = ChartBuilder::on(root)
        .margin_left(left)
        .margin_right(right)
        .margin_top(top)
        .margin_bottom(bottom)
        .build_cartesian_2d(0f64..x_max, y_lo..y_hi)
        .map_err(plot_err)?;
    let (xt, xs) = ticks(0.0, x_max, 8);
    let (yt, ys) = ticks(y_lo, y_hi, 6);
    let x_labels: Vec<(String, (i32, i32))> = xt
        .iter()
        .map(|&x| (tick_label(x, xs), chart.backend_coord(&(x, y_lo))))
        .collect();
    let y_labels: Vec<(String, (i32, i32))> = yt
        .iter()
        .map(|&y| (tick_label(y, ys), chart.backend_coord(&(0.0, y))))
        .collect();
    for &x in &xt {
        chart
            .draw_series(LineSeries::new([(x, y_lo), (x, y_hi)], GRID_COLOR))
            .map_err(plot_err)?;
    }
    for &y in &yt {
        chart
            .draw_series(LineSeries::new([(0.0, y), (x_max, y)], GRID_COLOR))
            .map_err(plot_err)?;
    }
    for (label, (cx, cy)) in &x_labels {
        draw_text(
            root,
            label,
            (cx - text_width(label) / 2, cy + 8),
            &AXIS_COLOR,
        )?;
    }
    for (label, (cx, cy)) in &y_labels {
        draw_text(
            root,
            label,
            (cx - text_width(label) - 8, cy - 7),
            &AXIS_COLOR,
        )?;
    }
    let axes = [(0.0, y_hi), (0.0, y_lo), (x_max, y_lo)];
    chart
        .draw_series(LineSeries::new(axes, AXIS_COLOR.stroke_width(2)))
        .map_err(plot_err)?;
    let pts = |v: &[(usize, f64)]| -> Vec<(f64, f64)> {
        v.iter()
            .filter(finite)
            .map(|&(s, l)| (s as f64, l))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(pts(train), TRAIN_COLOR.stroke_width(2)))
        .map_err(plot_err)?;
    let v = pts(val);
    chart
        .draw_series(LineSeries::new(v.clone(), VAL_COLOR.stroke_width(2)))
        .map_err(plot_err)?;
    chart
        .draw_series(v.iter().map(|&p| Circle::new(p, 4, VAL_COLOR.filled())))
        .map_err(plot_err)?;
    // Axis titles and the legend.
    let (w, h) = (W as i32, H as i32);
    draw_text(
        root,
        "step",
        (w / 2 - text_width("step") / 2, h - 22),
        &AXIS_COLOR,
    )?;
    draw_text(root, "loss", (8, 12), &AXIS_COLOR)?;
    let mut lx = w - right - 200;
    for (name, color) in [("train", TRAIN_COLOR), ("val", VAL_COLOR)] {
        root.draw(&Rectangle::new([(lx, 16), (lx + 24, 19)], color.filled()))
            .map_err(plot_err)?;
        draw_text(root, name, (lx + 32, 11), &AXIS_COLOR)?;
        lx += 32 + text_width(name) + 30;
    }
    Ok(())
}
