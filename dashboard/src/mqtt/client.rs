//! The browser side of the MQTT link: owns the WebSocket, feeds [`Session`], reconnects.

use futures::future::{Either, select};
use futures::{SinkExt, StreamExt};
use gloo_net::websocket::{Message, futures::WebSocket};
use gloo_timers::future::{IntervalStream, TimeoutFuture};

use super::backoff::Backoff;
use super::frames::{Frame, Splitter};
use super::session::{Output, PING_EVERY_MS, Session};
use super::{ConnState, Event, client_id};
use crate::log;

/// Starts the client; it runs for the life of the page.
pub fn spawn(url: String, filter: &'static str, on_event: impl Fn(Event) + 'static) {
    wasm_bindgen_futures::spawn_local(run(url, filter, on_event));
}

async fn run(url: String, filter: &'static str, on_event: impl Fn(Event)) {
    let mut backoff = Backoff::new();
    loop {
        on_event(Event::State(ConnState::Connecting));
        let why = connect_once(&url, filter, &on_event, &mut backoff).await;
        on_event(Event::State(ConnState::Disconnected));
        let delay = backoff.next_delay_ms(js_sys::Math::random());
        log::warn(&format!(
            "renkei: MQTT connection to {url} ended ({why}); retrying in {delay} ms"
        ));
        TimeoutFuture::new(delay).await;
    }
}

/// One connection from open to close; returns why it ended.
async fn connect_once(
    url: &str,
    filter: &str,
    on_event: &impl Fn(Event),
    backoff: &mut Backoff,
) -> String {
    let mut ws = match WebSocket::open_with_protocol(url, "mqtt") {
        Ok(ws) => ws,
        Err(e) => return format!("cannot open: {e}"),
    };
    let (mut session, connect) =
        match Session::open(&client_id(js_sys::Math::random()), filter, now_ms()) {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
    // Waits for the socket to open; an error that closes it shows up on the stream below.
    if let Err(e) = ws.send(Message::Bytes(connect.to_vec())).await {
        return format!("cannot send CONNECT: {e}");
    }
    let mut splitter = Splitter::new();
    let mut ping = IntervalStream::new(PING_EVERY_MS);
    let mut outputs = Vec::new();
    loop {
        let woken = select(ws.next(), ping.next()).await;
        let bytes = match woken {
            Either::Left((Some(Ok(Message::Bytes(bytes))), _)) => bytes,
            Either::Left((Some(Ok(Message::Text(_))), _)) => {
                return "broker sent a text frame".into();
            }
            Either::Left((Some(Err(e)), _)) => return e.to_string(),
            Either::Left((None, _)) => return "socket closed".into(),
            Either::Right(_) => match session.on_ping_timer(now_ms()) {
                Ok(ping) => {
                    if let Err(e) = ws.send(Message::Bytes(ping.to_vec())).await {
                        return e.to_string();
                    }
                    continue;
                }
                Err(e) => return e.to_string(),
            },
        };
        splitter.push(&bytes);
        loop {
            let packet = match splitter.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Packet(packet))) => packet,
                Ok(Some(Frame::Oversize(len))) => {
                    log::warn(&format!("renkei: skipped an MQTT packet of {len} bytes"));
                    continue;
                }
                Ok(Some(Frame::Invalid(e))) => {
                    log::warn(&format!(
                        "renkei: skipped an undecodable MQTT packet: {e:?}"
                    ));
                    continue;
                }
                Err(e) => return format!("MQTT stream out of step: {:?}", e.0),
            };
            let phase = session.phase();
            if let Err(e) = session.on_packet(packet, now_ms(), &mut outputs) {
                return format!("{e} (while {phase:?})");
            }
            for output in outputs.drain(..) {
                match output {
                    Output::Send(bytes) => {
                        if let Err(e) = ws.send(Message::Bytes(bytes.to_vec())).await {
                            return e.to_string();
                        }
                    }
                    Output::Subscribed => {
                        backoff.reset();
                        on_event(Event::State(ConnState::Connected));
                    }
                    Output::Deliver(message) => on_event(Event::Message(message)),
                }
            }
        }
    }
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}
