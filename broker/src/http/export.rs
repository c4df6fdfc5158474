//! Exports of the live state for onward reporting: sites as CSV and GeoJSON, active alerts as
//! CAP 1.2 XML.
//!
//! All three are small hand-written formats: CSV quoting, a GeoJSON feature list and a few
//! CAP elements with XML escaping do not justify three more dependencies.

use std::fmt::Write as _;

use renkei_shared::reducer::SiteState;
use renkei_shared::{
    Alert, AlertSource, Certainty, Mode, Severity, SiteRef, State, Timestamp, Urgency, WardCode,
    World,
};

fn sites_of(world: &World, ward: Option<WardCode>) -> impl Iterator<Item = (&SiteRef, &SiteState)> {
    world
        .sites
        .iter()
        .filter(move |(site, s)| s.last_heard.is_some() && ward.is_none_or(|w| w == site.ward))
}

/// One CSV field, quoted when it must be (RFC 4180).
fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// Every site heard from in `mode`, one line each, with its latest status and shelter figures.
pub fn sites_csv(state: &State, mode: Mode, ward: Option<WardCode>, now: Timestamp) -> String {
    let mut out = String::from(
        "ward,ward_name,site,name,kind,last_heard_ms,silent,shelter_state,capacity,evacuees,\
         occupancy_pct,open_requests,incidents,lat,lon\r\n",
    );
    for (site, s) in sites_of(state.world(mode), ward) {
        let status = s.status.as_ref().map(|v| &v.value);
        let shelter = s.shelter.as_ref().map(|v| &v.value);
        let location = status.and_then(|st| st.location);
        let shelter_state = shelter.map(|sh| {
            serde_json::to_value(sh.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        });
        let fields = [
            site.ward.to_string(),
            site.ward.ward().map_or("", |w| w.name_en).to_owned(),
            site.site.to_string(),
            s.name().unwrap_or("").to_owned(),
            opt(status.map(|st| st.kind.as_str())),
            opt(s.last_heard.map(|t| t.0)),
            s.is_silent(now).to_string(),
            shelter_state.unwrap_or_default(),
            opt(shelter.and_then(|sh| sh.capacity)),
            opt(shelter.and_then(|sh| sh.evacuees)),
            opt(s.occupancy_pct()),
            s.requests
                .values()
                .filter(|r| r.is_open())
                .count()
                .to_string(),
            s.incidents.len().to_string(),
            opt(location.map(|p| p.lat())),
            opt(location.map(|p| p.lon())),
        ];
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv_field(&mut out, field);
        }
        out.push_str("\r\n");
    }
    out
}

/// Sites with a known location as a GeoJSON FeatureCollection (Point, lon/lat).
pub fn sites_geojson(
    state: &State,
    mode: Mode,
    ward: Option<WardCode>,
    now: Timestamp,
) -> serde_json::Value {
    let world = state.world(mode);
    let rollups = world.rollups(now);
    let features: Vec<_> = sites_of(world, ward)
        .filter_map(|(site, s)| {
            let status = &s.status.as_ref()?.value;
            let location = status.location?;
            let level = rollups
                .iter()
                .find(|r| r.ward == site.ward)
                .map_or("no_data", |r| r.level().as_str());
            Some(serde_json::json!({
                "type": "Feature",
                "id": format!("{}/{}", site.ward, site.site),
                "geometry": { "type": "Point", "coordinates": [location.lon(), location.lat()] },
                "properties": {
                    "ward": site.ward,
                    "site": site.site,
                    "name": status.name,
                    "kind": status.kind.as_str(),
                    "last_heard": s.last_heard,
                    "silent": s.is_silent(now),
                    "occupancy_pct": s.occupancy_pct(),
                    "evacuees": s.shelter.as_ref().and_then(|sh| sh.value.evacuees),
                    "capacity": s.shelter.as_ref().and_then(|sh| sh.value.capacity),
                    "ward_level": level,
                },
            }))
        })
        .collect();
    serde_json::json!({ "type": "FeatureCollection", "features": features })
}

/// XML text with `& < > " '` escaped.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newlines are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

/// A CAP date-time (`2026-09-01T00:00:00+00:00`; CAP does not allow `Z`).
pub fn cap_time(t: Timestamp) -> String {
    let secs = t.0.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn cap_severity(s: Severity) -> &'static str {
    match s {
        Severity::Unknown => "Unknown",
        Severity::Minor => "Minor",
        Severity::Moderate => "Moderate",
        Severity::Severe => "Severe",
        Severity::Extreme => "Extreme",
    }
}

fn cap_urgency(u: Urgency) -> &'static str {
    match u {
        Urgency::Immediate => "Immediate",
        Urgency::Expected => "Expected",
        Urgency::Future => "Future",
        Urgency::Past => "Past",
        Urgency::Unknown => "Unknown",
    }
}

fn cap_certainty(c: Certainty) -> &'static str {
    match c {
        Certainty::Observed => "Observed",
        Certainty::Likely => "Likely",
        Certainty::Possible => "Possible",
        Certainty::Unlikely => "Unlikely",
        Certainty::Unknown => "Unknown",
    }
}

fn cap_status(mode: Mode) -> &'static str {
    match mode {
        Mode::Actual => "Actual",
        Mode::Exercise => "Exercise",
        Mode::Test => "Test",
    }
}

/// The active alerts of `mode` as CAP 1.2 `<alert>` elements inside one `<alerts>` document.
pub fn alerts_cap(state: &State, mode: Mode, ward: Option<WardCode>, now: Timestamp) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<alerts>\n");
    for entry in state.world(mode).alerts.values() {
        let Some((_, sent_at, alert)) = &entry.alert else {
            continue;
        };
        if !entry.is_active(now) || ward.is_some_and(|w| !alert.wards.contains(&w)) {
            continue;
        }
        cap_alert(&mut out, alert, *sent_at, mode);
    }
    out.push_str("</alerts>\n");
    out
}

fn cap_alert(out: &mut String, a: &Alert, sent_at: Timestamp, mode: Mode) {
    let e = xml_escape;
    let event = match a.source {
        AlertSource::Operator => "operator".to_owned(),
        AlertSource::Rule(kind) => serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    };
    let _ = write!(
        out,
        "<alert xmlns=\"urn:oasis:names:tc:emergency:cap:1.2\">\n\
         <identifier>{}</identifier>\n<sender>renkei-broker</sender>\n<sent>{}</sent>\n\
         <status>{}</status>\n<msgType>Alert</msgType>\n<scope>Restricted</scope>\n\
         <restriction>Tokyo special wards disaster HQ</restriction>\n\
         <info>\n<language>ja-JP</language>\n<category>Safety</category>\n<event>{}</event>\n\
         <urgency>{}</urgency>\n<severity>{}</severity>\n<certainty>{}</certainty>\n",
        e(a.alert_id.as_str()),
        cap_time(sent_at),
        cap_status(mode),
        e(&event),
        cap_urgency(a.urgency),
        cap_severity(a.severity),
        cap_certainty(a.certainty),
    );
    if let Some(expires) = a.expires_at {
        let _ = writeln!(out, "<expires>{}</expires>", cap_time(expires));
    }
    let _ = write!(
        out,
        "<headline>{}</headline>\n<description>{}</description>\n<instruction>{}</instruction>\n",
        e(&a.headline),
        e(&a.description),
        e(&a.instruction)
    );
    for ward in &a.wards {
        let name = ward.ward().map_or(String::new(), |w| w.name_ja.to_owned());
        let _ = write!(
            out,
            "<area>\n<areaDesc>{}</areaDesc>\n<geocode>\n<valueName>JIS X 0402</valueName>\n\
             <value>{ward}</value>\n</geocode>\n</area>\n",
            e(&name)
        );
    }
    out.push_str("</info>\n</alert>\n");
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Body, sample};

    use super::*;

    #[test]
    fn cap_times_and_escaping() {
        assert_eq!(cap_time(Timestamp(0)), "1970-01-01T00:00:00+00:00");
        assert_eq!(cap_time(sample::SENT_AT), "2026-09-01T00:00:00+00:00");
        assert_eq!(
            xml_escape("<a href=\"x\">&'\u{1}</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&apos;&lt;/a&gt;"
        );
    }

    #[test]
    fn exports_the_sample_state() {
        let mut state = State::new();
        for env in sample::all() {
            state.apply(&env);
        }
        let now = sample::SENT_AT.plus_secs(10);
        let csv = sites_csv(&state, Mode::Actual, None, now);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2, "{csv}");
        assert!(lines[1].starts_with("131041,Shinjuku,nishi-shinjuku-es,西新宿小学校,shelter,"));
        assert!(
            sites_csv(&state, Mode::Actual, Some(WardCode(131016)), now)
                .lines()
                .count()
                == 1
        );

        let geo = sites_geojson(&state, Mode::Actual, None, now);
        assert_eq!(geo["features"][0]["geometry"]["coordinates"][0], 139.6917);
        assert_eq!(geo["features"][0]["properties"]["evacuees"], 312);

        let mut alert = sample::alert();
        if let Body::Alert(a) = &mut alert.body {
            a.headline = "<b>満員</b> & more".into();
        }
        alert.header.seq = 99;
        state.apply(&alert);
        let cap = alerts_cap(&state, Mode::Actual, None, now);
        assert!(
            cap.contains("<headline>&lt;b&gt;満員&lt;/b&gt; &amp; more</headline>"),
            "{cap}"
        );
        assert!(cap.contains("<identifier>occ-131041-nishi-shinjuku-es</identifier>"));
        assert!(cap.contains("<severity>Severe</severity>"));
        assert!(cap.contains("<value>131041</value>"));
        assert!(!alerts_cap(&state, Mode::Actual, Some(WardCode(131016)), now).contains("<alert "));
    }
}
