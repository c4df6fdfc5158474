//! The topic parser on arbitrary text.
//!
//! Checks, for any UTF-8 input (the broker reads topics with `str::from_utf8`):
//! - `Topic::parse` and `Topic::parse_json` return (never panic);
//! - what parses is canonical: Display∘parse (and json∘parse_json) gives the input back, so a
//!   topic has one spelling and the broker's `expected == published` comparison is exact;
//! - the two trees agree: a postcard topic parses in the JSON mirror and back, and vice versa;
//! - the filters built for a parsed site match the topic (`site_filter`, `ward_filter`) and
//!   `command_filter` is the command topic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use renkei_shared::Topic;
use renkei_shared::topic::{self, JSON_ROOT, ROOT};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Topic::parse(text) {
        assert_eq!(t.to_string(), text, "Display∘parse is not the identity");
        let json = t.json();
        assert!(json.starts_with(JSON_ROOT));
        assert_eq!(Topic::parse_json(&json).as_ref(), Ok(&t));
        check_filters(&t, text);
    }
    if let Ok(t) = Topic::parse_json(text) {
        assert_eq!(t.json(), text, "json∘parse_json is not the identity");
        let plain = t.to_string();
        assert!(plain.starts_with(ROOT));
        assert_eq!(Topic::parse(&plain).as_ref(), Ok(&t));
    }
});

fn check_filters(t: &Topic, text: &str) {
    match t {
        Topic::Site { site, .. } => {
            let under = |filter: String| {
                let prefix = filter.strip_suffix('#').expect("a site filter ends in #");
                assert!(text.starts_with(prefix), "{text} is not under {filter}");
            };
            under(topic::site_filter(site));
            under(topic::ward_filter(site.ward));
        }
        Topic::Command { site } => assert_eq!(topic::command_filter(site), text),
        Topic::Alert { .. } | Topic::AlertAck { .. } | Topic::RequestAck { .. } => {
            let prefix = topic::HQ_FILTER.strip_suffix('#').expect("ends in #");
            assert!(
                text.starts_with(prefix),
                "{text} is not under the HQ filter"
            );
        }
    }
}
