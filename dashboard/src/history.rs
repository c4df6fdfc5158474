//! A shelter's recorded reports, fetched from the broker's HTTP API, and the geometry of the
//! chart that draws them.
//!
//! The chart is hand-drawn SVG: a few dozen lines of polyline arithmetic beat shipping a
//! charting library to every HQ browser. Everything here is plain data, so the scaling, the
//! JST axis labels and the parsing are tested natively; the component only prints it.

use std::collections::BTreeSet;

use renkei_shared::{Mode, SiteRef, Timestamp};
use serde::Deserialize;

use crate::i18n::clock_jst;

/// Reports asked for: the API's default, enough for a day at one report every three minutes.
pub const LIMIT: u32 = 500;

/// The API path of a site's shelter reports.
pub fn path(site: &SiteRef) -> String {
    format!(
        "/api/v1/sites/{}/{}/history?kind=shelter&limit={LIMIT}",
        site.ward, site.site
    )
}

/// The `Authorization` header of HTTP Basic auth.
///
/// Base64 in a dozen lines instead of a dependency; the browser's `btoa` would refuse a user
/// name outside Latin-1.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut out = String::with_capacity(6 + bytes.len().div_ceil(3) * 4);
    out.push_str("Basic ");
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One shelter report on the chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// When the shelter's staff sent it (not when the broker got it: a backlog replayed
    /// after an outage belongs where it was reported).
    pub at: Timestamp,
    pub evacuees: Option<u32>,
    pub capacity: Option<u32>,
}

/// Why the history could not be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryError {
    /// The request did not reach the broker, or its answer was cut short.
    Network(String),
    /// The broker answered with an error status.
    Status(u16),
    /// The answer was not the documented JSON.
    Format(String),
}

impl std::fmt::Display for HistoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HistoryError::Network(e) => write!(f, "network: {e}"),
            HistoryError::Status(code) => write!(f, "HTTP {code}"),
            HistoryError::Format(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    /// `null` where the broker could not read its own row.
    envelope: serde_json::Value,
}

/// The fields of a recorded envelope the chart reads. Reading only these, not the whole
/// [`renkei_shared::Envelope`], keeps a JSON reader for every message type out of the wasm.
#[derive(Deserialize)]
struct Recorded {
    header: RecordedHeader,
    /// `{"shelter": {...}}` for a shelter report; any other kind is skipped.
    body: serde_json::Value,
}

#[derive(Deserialize)]
struct RecordedHeader {
    boot: u32,
    seq: u64,
    sent_at: Timestamp,
    mode: Mode,
}

#[derive(Deserialize)]
struct RecordedShelter {
    evacuees: Option<u32>,
    capacity: Option<u32>,
}

/// The shelter reports of `mode`'s world in an API answer, in the order they were sent.
///
/// The recorder keeps every world, so drills are filtered out here. A report that does not
/// read is skipped rather than failing the chart; the same report recorded twice counts once.
pub fn points(body: &str, mode: Mode) -> Result<Vec<Point>, HistoryError> {
    let answer: Answer =
        serde_json::from_str(body).map_err(|e| HistoryError::Format(e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut points: Vec<(u32, u64, Point)> = answer
        .events
        .into_iter()
        .filter_map(|e| Recorded::deserialize(&e.envelope).ok())
        .filter(|env| env.header.mode == mode)
        .filter(|env| seen.insert((env.header.boot, env.header.seq)))
        .filter_map(|env| {
            let shelter = env.body.get("shelter")?;
            let s = RecordedShelter::deserialize(shelter).ok()?;
            let h = env.header;
            Some((
                h.boot,
                h.seq,
                Point {
                    at: h.sent_at,
                    evacuees: s.evacuees,
                    capacity: s.capacity,
                },
            ))
        })
        .collect();
    points.sort_by_key(|&(boot, seq, p)| (p.at, boot, seq));
    Ok(points.into_iter().map(|(_, _, p)| p).collect())
}

/// Size of the chart's drawing, in SVG user units (the SVG scales to its box).
pub const WIDTH: f64 = 640.0;
pub const HEIGHT: f64 = 220.0;
/// Room for the axis labels.
const LEFT: f64 = 48.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 28.0;
/// Time labels along the bottom.
const TIME_TICKS: usize = 4;

/// What the chart component draws.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// `points` of the evacuees polyline.
    pub evacuees: String,
    /// Each plotted evacuee figure, for dots and tooltips: `(x, y, value, time label)`.
    pub dots: Vec<(f64, f64, u32, String)>,
    /// `points` of the capacity line (a step line: capacity holds until the next report).
    pub capacity: String,
    /// Horizontal grid lines: `(y, label)`.
    pub y_ticks: Vec<(f64, String)>,
    /// Time labels in JST: `(x, label)`.
    pub x_ticks: Vec<(f64, String)>,
    /// The top of the scale.
    pub y_max: u32,
}

impl Chart {
    /// The points that are drawn: reports that gave an evacuee count.
    pub fn plotted(&self) -> usize {
        self.dots.len()
    }
}

/// A round number at or above `n` (1, 2 or 5 × a power of ten), so grid lines read easily.
fn nice_ceiling(n: u32) -> u32 {
    let mut step = 1u32;
    loop {
        for m in [1, 2, 5] {
            let v = step.saturating_mul(m);
            if v >= n || v == u32::MAX {
                return v;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// Lays out `points` (in time order); `None` when there is nothing to draw.
pub fn chart(points: &[Point]) -> Option<Chart> {
    let first = points.iter().find(|p| p.evacuees.is_some())?.at;
    let last = points
        .iter()
        .rev()
        .find(|p| p.evacuees.is_some() || p.capacity.is_some())
        .map_or(first, |p| p.at);
    let start = points.first().map_or(first, |p| p.at).min(first);
    let end = last.max(first);
    let top = points
        .iter()
        .flat_map(|p| [p.evacuees, p.capacity])
        .flatten()
        .max()
        .unwrap_or(0);
    let y_max = nice_ceiling(top.max(1));
    let span = end.millis_since(start);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: Timestamp| {
        if span <= 0 {
            // One instant: the point sits in the middle.
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * t.millis_since(start) as f64 / span as f64
        }
    };
    let y = |v: u32| TOP + plot_h * (1.0 - f64::from(v) / f64::from(y_max));
    let fmt = |x: f64, y: f64| format!("{x:.1},{y:.1}");
    let label = |t: Timestamp| {
        let clock = clock_jst(t);
        // Seconds matter only when the whole chart spans minutes.
        if span < 10 * 60 * 1000 {
            clock
        } else {
            clock[..5].to_owned()
        }
    };

    let dots: Vec<_> = points
        .iter()
        .filter_map(|p| {
            p.evacuees
                .map(|v| (x(p.at), y(v), v, format!("{} JST", clock_jst(p.at))))
        })
        .collect();
    let evacuees = dots
        .iter()
        .map(|(px, py, _, _)| fmt(*px, *py))
        .collect::<Vec<_>>()
        .join(" ");

    let mut capacity = Vec::new();
    let with_capacity: Vec<_> = points
        .iter()
        .filter_map(|p| p.capacity.map(|c| (x(p.at), c)))
        .collect();
    for (i, &(px, c)) in with_capacity.iter().enumerate() {
        if let Some(&(_, prev)) = i.checked_sub(1).and_then(|j| with_capacity.get(j)) {
            capacity.push(fmt(px, y(prev)));
        }
        capacity.push(fmt(px, y(c)));
    }
    // The last known capacity holds to the end of the chart.
    if let Some(&(px, c)) = with_capacity.last() {
        let right = if span <= 0 { LEFT + plot_w } else { x(end) };
        if right > px {
            capacity.push(fmt(right, y(c)));
        }
    }

    let y_ticks = (0..=4)
        .map(|i| {
            let v = y_max / 4 * i;
            let v = if i == 4 { y_max } else { v };
            (y(v), v.to_string())
        })
        .collect();
    let x_ticks = if span <= 0 {
        vec![(x(start), label(start))]
    } else {
        (0..TIME_TICKS)
            .map(|i| {
                let t = Timestamp(start.0 + span * i as i64 / (TIME_TICKS as i64 - 1));
                (x(t), label(t))
            })
            .collect()
    };
    Some(Chart {
        evacuees,
        dots,
        capacity: capacity.join(" "),
        y_ticks,
        x_ticks,
        y_max,
    })
}

/// The plot's edges, for the axes: `(left, top, right, bottom)`.
pub fn plot_area() -> (f64, f64, f64, f64) {
    (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Body, Envelope, Id, WardCode, sample};

    use super::*;

    fn answer(envs: &[Envelope]) -> String {
        let events: Vec<_> = envs
            .iter()
            .enumerate()
            .map(|(i, e)| serde_json::json!({ "received_at": i, "envelope": e }))
            .collect();
        serde_json::json!({ "site": { "ward": 131041, "site": "x" }, "events": events }).to_string()
    }

    fn shelter(evacuees: Option<u32>, seq: u64, secs: i64) -> Envelope {
        let mut env = sample::shelter();
        env.header.seq = seq;
        env.header.sent_at = sample::SENT_AT.plus_secs(secs);
        if let Body::Shelter(s) = &mut env.body {
            s.evacuees = evacuees;
        }
        env
    }

    #[test]
    fn reads_the_apis_answer_for_one_world_in_sending_order() {
        let mut drill = shelter(Some(5), 50, 5);
        drill.header.mode = Mode::Exercise;
        let body = answer(&[
            shelter(Some(30), 3, 30),
            shelter(Some(10), 1, 10),
            drill,
            shelter(Some(30), 3, 30),
            sample::status(),
        ]);
        // A row the broker could not read comes as null and is skipped.
        let body = body.replacen(
            r#""events":["#,
            r#""events":[{"received_at":0,"envelope":null},"#,
            1,
        );
        assert!(body.contains("null"));
        let points = points(&body, Mode::Actual).unwrap();
        let evacuees: Vec<_> = points.iter().map(|p| p.evacuees).collect();
        assert_eq!(evacuees, [Some(10), Some(30)]);
        assert_eq!(points[0].capacity, Some(450));
        assert_eq!(super::points(&body, Mode::Exercise).unwrap().len(), 1);
        assert!(matches!(
            super::points("<html>", Mode::Actual),
            Err(HistoryError::Format(_))
        ));
        let empty = r#"{"site":{"ward":131041,"site":"x"},"events":[]}"#;
        assert!(super::points(empty, Mode::Actual).unwrap().is_empty());
    }

    #[test]
    fn basic_auth_is_rfc_7617() {
        // The example of RFC 7617 section 2.
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic_auth("a", ""), "Basic YTo=");
        assert_eq!(basic_auth("ab", "c"), "Basic YWI6Yw==");
        assert_eq!(basic_auth("佐藤", "x"), "Basic 5L2Q6JekOng=");
    }

    #[test]
    fn the_path_names_the_site_and_asks_for_shelter_reports() {
        let site = SiteRef {
            ward: WardCode(131041),
            site: Id::new("nishi-es").unwrap(),
        };
        assert_eq!(
            path(&site),
            "/api/v1/sites/131041/nishi-es/history?kind=shelter&limit=500"
        );
    }

    #[test]
    fn lays_out_points_capacity_and_jst_labels() {
        let p = |secs: i64, evacuees: Option<u32>| Point {
            at: sample::SENT_AT.plus_secs(secs),
            evacuees,
            capacity: Some(450),
        };
        let points = [p(0, Some(100)), p(1800, None), p(3600, Some(312))];
        let chart = chart(&points).unwrap();
        assert_eq!(chart.plotted(), 2);
        assert_eq!(chart.y_max, 500);
        let (left, top, right, bottom) = plot_area();
        // First point at the left edge, last at the right; 0 at the bottom, 500 at the top.
        let (x0, y0, v0, _) = &chart.dots[0];
        assert_eq!((*x0, *v0), (left, 100));
        assert!((y0 - (bottom - (bottom - top) * 0.2)).abs() < 1e-9);
        assert_eq!(chart.dots[1].0, right);
        assert_eq!(chart.evacuees.split(' ').count(), 2);
        // The step line holds 450 across the chart.
        assert!(chart.capacity.split(' ').count() >= 2);
        // The samples were sent at 09:00 JST; an hour-long chart labels minutes only.
        let labels: Vec<_> = chart.x_ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["09:00", "09:20", "09:40", "10:00"]);
        assert_eq!(chart.y_ticks.last().unwrap().1, "500");
        assert_eq!(chart.dots[1].3, "10:00:00 JST");
    }

    #[test]
    fn a_single_report_sits_in_the_middle_and_nothing_draws_nothing() {
        let one = [Point {
            at: sample::SENT_AT,
            evacuees: Some(7),
            capacity: None,
        }];
        let chart = chart(&one).unwrap();
        assert_eq!(chart.plotted(), 1);
        assert_eq!(chart.y_max, 10);
        assert_eq!(chart.x_ticks.len(), 1);
        assert!(chart.capacity.is_empty());
        let unknown = [Point {
            at: sample::SENT_AT,
            evacuees: None,
            capacity: Some(10),
        }];
        assert!(super::chart(&unknown).is_none());
        assert!(super::chart(&[]).is_none());
    }

    #[test]
    fn scales_round_up_to_readable_numbers() {
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(456), 500);
        assert_eq!(nice_ceiling(501), 1000);
        assert_eq!(nice_ceiling(1001), 2000);
    }
}
