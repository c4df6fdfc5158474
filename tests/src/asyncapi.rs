//! The AsyncAPI document for integrators (`docs/asyncapi.yaml`), generated from the model.
//!
//! The topic table below and the JSON Schema of [`Envelope`] (derived from the Rust types by
//! schemars) make the document, so it cannot drift from the code: `tests/tests/asyncapi.rs`
//! fails when the checked-in file differs, and checks real broker output against it.

use renkei_shared::Envelope;
use renkei_shared::mirror::Mirrored;
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

/// Each channel: name, address in the JSON mirror, the body it carries, retained, summary.
const CHANNELS: &[(&str, &str, &str, bool, &str)] = &[
    (
        "siteStatus",
        "renkei/json/v1/{ward}/{site}/status",
        "status",
        true,
        "Site status (heartbeat, 死活・拠点状態): kind, HQ state, power, battery, communications, reporting interval.",
    ),
    (
        "shelterStatus",
        "renkei/json/v1/{ward}/{site}/shelter",
        "shelter",
        true,
        "Shelter status (避難所状況): state, capacity, evacuees, people needing care, lifelines, building safety.",
    ),
    (
        "supplyStock",
        "renkei/json/v1/{ward}/{site}/supplies",
        "supplies",
        true,
        "Stock on hand (在庫) per item, with daily need.",
    ),
    (
        "siteLife",
        "renkei/json/v1/{ward}/{site}/life",
        "life",
        true,
        "Birth on every connect, death by MQTT last will: tells a silent site from a quiet one.",
    ),
    (
        "supplyRequest",
        "renkei/json/v1/{ward}/{site}/request/{requestId}",
        "request",
        true,
        "A supply request (物資要請) as the site last reported it.",
    ),
    (
        "incident",
        "renkei/json/v1/{ward}/{site}/incident/{incidentId}",
        "incident",
        true,
        "An incident / damage report (被害報告), national form 第4号様式 counts; unknown counts are null.",
    ),
    (
        "alert",
        "renkei/json/v1/hq/alert/{alertId}",
        "alert",
        true,
        "A CAP-style alert raised by HQ staff or a broker rule.",
    ),
    (
        "alertAck",
        "renkei/json/v1/hq/ack/alert/{alertId}/{user}",
        "ack",
        true,
        "A user's latest answer (確認応答) to an alert.",
    ),
    (
        "requestAck",
        "renkei/json/v1/hq/ack/request/{ward}/{site}/{requestId}",
        "ack",
        true,
        "HQ's latest lifecycle step on a supply request (accept, commit, ship, deliver, decline).",
    ),
    (
        "command",
        "renkei/json/v1/cmd/{ward}/{site}",
        "command",
        false,
        "A command from HQ to an agent (send a full report, change the heartbeat interval). It stays good for one hour after its `sent_at`.",
    ),
    (
        "commandResult",
        "renkei/json/v1/{ward}/{site}/command/{commandId}",
        "command_result",
        false,
        "A site's answer to a command, once per command: `done` (carried out) or `expired` (it reached the site more than one hour after its `sent_at`, and was not carried out). `GET /api/v1/commands` lists each command with its answer.",
    ),
];

fn parameters(address: &str) -> Value {
    let mut params = serde_json::Map::new();
    for name in address
        .split('/')
        .filter_map(|l| l.strip_prefix('{')?.strip_suffix('}'))
    {
        let description = match name {
            "ward" => "Six-digit official local-government code of the ward, e.g. 131041 (新宿区).",
            "site" => "Site id within Renkei: 1–64 characters of A–Z a–z 0–9 _ -.",
            "user" => "User name of the operator who answered.",
            _ => "Id: 1–64 characters of A–Z a–z 0–9 _ -.",
        };
        params.insert(name.to_owned(), json!({ "description": description }));
    }
    Value::Object(params)
}

/// The whole AsyncAPI 3.0 document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft07();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    let envelope = generator.subschema_for::<Envelope>();
    let mirrored = generator.subschema_for::<Mirrored>();
    let line = generator.subschema_for::<renkei_shared::line::LineReport>();
    let mut schemas = generator.take_definitions(true);
    if !schemas.contains_key("Envelope") {
        schemas.insert("Envelope".into(), envelope.to_value());
    }
    if !schemas.contains_key("Mirrored") {
        schemas.insert("Mirrored".into(), mirrored.to_value());
    }
    if !schemas.contains_key("LineReport") {
        schemas.insert("LineReport".into(), line.to_value());
    }

    let mut channels = serde_json::Map::new();
    let mut operations = serde_json::Map::new();
    let mut messages = serde_json::Map::new();
    for (name, address, body, retained, summary) in CHANNELS {
        let message = format!("{name}Message");
        channels.insert(
            (*name).into(),
            json!({
                "address": address,
                "description": format!(
                    "{summary} Retained: {}. The same message in postcard is on `{}`.",
                    if *retained { "yes (latest state)" } else { "no" },
                    address.replacen("renkei/json/v1", "renkei/v1", 1)
                ),
                "parameters": parameters(address),
                "messages": { message.clone(): { "$ref": format!("#/components/messages/{message}") } },
            }),
        );
        operations.insert(
            format!("receive{}{}", name[..1].to_uppercase(), &name[1..]),
            json!({
                "action": "receive",
                "channel": { "$ref": format!("#/channels/{name}") },
                "messages": [{ "$ref": format!("#/channels/{name}/messages/{message}") }],
            }),
        );
        messages.insert(
            message,
            json!({
                "name": name,
                "contentType": "application/json",
                "summary": format!("An envelope whose body is `{body}`, with the time HQ received it."),
                "payload": { "$ref": "#/components/schemas/Mirrored" },
                "bindings": { "mqtt": { "qos": 1, "retain": retained } },
            }),
        );
    }

    // Not an envelope: a ward broker's word on its own line to HQ.
    channels.insert(
        "wardLine".into(),
        json!({
            "address": "renkei/link/v1/{ward}",
            "description": "A ward broker's report of its line to HQ (ward mode): how many of the ward's messages HQ's record does not have yet, whether HQ stores none of what it forwards (stalled), and when the ward broker made the report (its clock, Unix ms). Published by the ward's relay on connecting and every 5 s while connected; retained, so the last one stands while the ward is cut off. Not in the JSON mirror and not recorded.",
            "parameters": parameters("renkei/link/v1/{ward}"),
            "messages": { "wardLineMessage": { "$ref": "#/components/messages/wardLineMessage" } },
        }),
    );
    operations.insert(
        "receiveWardLine".into(),
        json!({
            "action": "receive",
            "channel": { "$ref": "#/channels/wardLine" },
            "messages": [{ "$ref": "#/channels/wardLine/messages/wardLineMessage" }],
        }),
    );
    messages.insert(
        "wardLineMessage".into(),
        json!({
            "name": "wardLine",
            "contentType": "application/json",
            "summary": "A ward broker's backlog to HQ.",
            "payload": { "$ref": "#/components/schemas/LineReport" },
            "bindings": { "mqtt": { "qos": 0, "retain": true } },
        }),
    );

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Renkei",
            "version": "1",
            "description": "Live disaster state shared by Tokyo's 23 special wards. Every message is an envelope: a header (origin ward and site, agent boot id, per-boot sequence number, time sent in Unix milliseconds, mode actual / exercise / test, historical replay flag) and one body. Integrators read the JSON mirror under renkei/json/v1/; the postcard tree under renkei/v1/ carries the same messages as one schema-version byte followed by postcard (see shared/tests/vectors/). Exercise and test messages must never be counted as actual. Counts that are unknown are null, never 0. Each JSON message is its envelope plus `received_at`, when HQ's broker received it (Unix ms, as its recorder keeps it). Nothing the recorder holds is lost to an integrator: one that was disconnected, or that gets a QoS 0 publish on `$renkei/skipped` (JSON `{\"filter\": ..., \"skipped\": n}`: it fell so far behind that the broker dropped n messages of that filter for it, sent before the next message it reads, whether it subscribed to that topic or not), fetches what it missed with `GET /api/v1/events?since_time=<the last received_at it has>` (OpenAPI: docs/openapi.yaml) and drops what it already holds by (origin, boot, seq). Generated from the Rust model: do not edit by hand (RENKEI_BLESS=1 cargo test -p renkei-tests --test asyncapi).",
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": { "host": "localhost:1883", "protocol": "mqtt", "protocolVersion": "3.1.1", "description": "renkei-broker, MQTT over TCP." },
            "brokerWebSocket": { "host": "localhost:8083", "protocol": "ws", "description": "renkei-broker, MQTT 3.1.1 over WebSocket (subprotocol mqtt)." },
        },
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages, "schemas": schemas },
    })
}

/// The document as YAML, as checked in.
pub fn yaml() -> anyhow::Result<String> {
    Ok(serde_norway::to_string(&document())?)
}

/// A validator for the JSON-mirror payload, built from a (checked-in) AsyncAPI document.
pub fn mirrored_validator(doc: &Value) -> anyhow::Result<jsonschema::Validator> {
    let schemas = doc
        .pointer("/components/schemas")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the document has no components.schemas"))?;
    let schema = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$ref": "#/components/schemas/Mirrored",
        "components": { "schemas": schemas },
    });
    jsonschema::validator_for(&schema).map_err(|e| anyhow::anyhow!("schema does not compile: {e}"))
}
