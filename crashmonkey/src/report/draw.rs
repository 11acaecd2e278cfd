//! The few SVG shapes the timelines are made of, written as text. Colours are presentation
//! attributes, not classes, so a drawing looks the same inline in the report and alone in an
//! `.svg` file. Every text argument is escaped here.

use super::text::esc;
use std::fmt::Write as _;

/// Width of the column of lane names at the left of a timeline.
pub const LANE_LABEL_WIDTH_PX: u32 = 200;
/// Height of one lane.
pub const LANE_HEIGHT_PX: u32 = 26;
/// Height of the legend above the lanes, and of the axis below them.
pub const LEGEND_HEIGHT_PX: u32 = 24;
/// Characters of a lane name drawn (the full name is in its tooltip).
pub const LANE_LABEL_CHARS_MAX: usize = 30;

/// An SVG document being written.
pub struct Canvas {
    body: String,
    width: u32,
    height: u32,
    title: String,
}

impl Canvas {
    pub fn new(width: u32, height: u32, title: &str) -> Canvas {
        Canvas {
            body: String::new(),
            width,
            height,
            title: title.to_string(),
        }
    }

    /// The drawing's width so far (its legend widens it).
    pub fn width(&self) -> u32 {
        self.width
    }

    /// A rectangle, with `tip` as its tooltip when not empty.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, tip: &str) {
        let _ = write!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}""#
        );
        self.close("rect", tip);
    }

    /// An outlined rectangle (no fill).
    pub fn frame(&mut self, x: f64, y: f64, w: f64, h: f64, stroke: &str, tip: &str) {
        let _ = write!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="none" stroke="{stroke}" stroke-width="2""#
        );
        self.close("rect", tip);
    }

    /// A closed polygon through `points`.
    pub fn polygon(&mut self, points: &[(f64, f64)], fill: &str, tip: &str) {
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = write!(
            self.body,
            r##"<polygon points="{}" fill="{fill}" stroke="#222" stroke-width="0.6""##,
            pts.join(" ")
        );
        self.close("polygon", tip);
    }

    /// A circle outline.
    pub fn ring(&mut self, cx: f64, cy: f64, r: f64, stroke: &str, tip: &str) {
        let _ = write!(
            self.body,
            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="{r:.1}" fill="none" stroke="{stroke}" stroke-width="2.5""#
        );
        self.close("circle", tip);
    }

    /// A line; dashed when `dashed`.
    pub fn line(&mut self, from: (f64, f64), to: (f64, f64), stroke: &str, dashed: bool) {
        let dash = if dashed {
            r#" stroke-dasharray="4 3""#
        } else {
            ""
        };
        let _ = write!(
            self.body,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="1.5"{dash}/>"#,
            from.0, from.1, to.0, to.1
        );
    }

    /// Text at (x, y): `s` is escaped here. `anchor` is `start`, `middle` or `end`.
    pub fn text(&mut self, x: f64, y: f64, s: &str, size: u32, anchor: &str, fill: &str) {
        let _ = write!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{}</text>"#,
            esc(s)
        );
    }

    /// A legend entry: a swatch and its meaning, at `x`; returns the x after it.
    pub fn legend(&mut self, x: f64, y: f64, fill: &str, what: &str) -> f64 {
        self.rect(x, y - 9.0, 10.0, 10.0, fill, "");
        self.text(x + 14.0, y, what, 11, "start", "#222");
        // 11 px sans-serif averages under 7 px a character.
        let next = x + 22.0 + 7.0 * what.chars().count() as f64;
        // The drawing grows to hold its legend.
        self.width = self.width.max(next.ceil() as u32 + 8);
        next
    }

    /// Ends the element `name` opened last, with `tip` as its tooltip when not empty.
    fn close(&mut self, name: &str, tip: &str) {
        if tip.is_empty() {
            self.body.push_str("/>");
        } else {
            let _ = write!(self.body, "><title>{}</title></{name}>", esc(tip));
        }
    }

    /// The finished document: `class` names it for the page (and its tests).
    pub fn finish(self, class: &str) -> String {
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" class="{}" width="{}" height="{}" viewBox="0 0 {} {}" font-family="sans-serif" role="img"><title>{}</title><rect width="100%" height="100%" fill="#fff"/>{}</svg>"##,
            esc(class),
            self.width,
            self.height,
            self.width,
            self.height,
            esc(&self.title),
            self.body
        )
    }
}
