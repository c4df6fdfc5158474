//! A ward broker's report of its line to HQ.
//!
//! A ward broker's uplink publishes it on `renkei/link/v1/{ward}` (JSON, retained, QoS 0)
//! when it connects and every [`REPORT_EVERY_S`] seconds after: how many of the ward's
//! messages HQ does not have yet. HQ keeps the last one it got, so that while the ward is cut
//! off its dashboard says how much was waiting when the ward was last heard, and, once the
//! line is back, how much is still catching up. Integrators may read it too.
//!
//! ```json
//! {"backlog": 1234, "stalled": false, "at": 1788220800000}
//! ```

use serde::{Deserialize, Serialize};

use crate::model::Timestamp;
use crate::ward::WardCode;

/// The root of the reports.
pub const LINE_ROOT: &str = "renkei/link/v1";
/// How often a connected uplink reports, in seconds.
pub const REPORT_EVERY_S: u64 = 5;
/// The longest report anyone need read (a report is about 50 bytes).
pub const MAX_REPORT_BYTES: usize = 256;

/// One report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LineReport {
    /// The ward's own messages not yet in HQ's record (sent or not).
    pub backlog: u64,
    /// HQ's broker takes the ward's messages but HQ has stored none for a while.
    pub stalled: bool,
    /// When the ward broker made the report (its clock).
    pub at: Timestamp,
}

/// `renkei/link/v1/{ward}`.
pub fn line_topic(ward: WardCode) -> String {
    format!("{LINE_ROOT}/{ward}")
}

/// The ward a report's topic names, if it is one.
pub fn parse_line_topic(topic: &str) -> Option<WardCode> {
    let code = topic.strip_prefix(LINE_ROOT)?.strip_prefix('/')?;
    let ward: WardCode = code.parse().ok()?;
    // `parse` takes any digits that name a ward; the topic must be its canonical spelling.
    (ward.to_string() == code).then_some(ward)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_topic_names_one_ward() {
        let ward = WardCode(131041);
        assert_eq!(line_topic(ward), "renkei/link/v1/131041");
        assert_eq!(parse_line_topic("renkei/link/v1/131041"), Some(ward));
        for bad in [
            "renkei/link/v1/131041/x",
            "renkei/link/v1/132012",
            "renkei/link/v1/+",
            "renkei/link/v1/",
            "renkei/v1/131041",
            "renkei/link/v1/0131041",
        ] {
            assert_eq!(parse_line_topic(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_report_reads_as_documented() {
        let text = r#"{"backlog": 1234, "stalled": false, "at": 1788220800000}"#;
        let report: LineReport = serde_json::from_str(text).unwrap();
        assert_eq!(
            report,
            LineReport {
                backlog: 1234,
                stalled: false,
                at: Timestamp(1_788_220_800_000),
            }
        );
        let again = serde_json::to_vec(&report).unwrap();
        assert!(again.len() <= MAX_REPORT_BYTES);
    }
}
