//! The browser side of the MQTT link: owns the WebSocket, feeds [`Session`], reconnects.

use futures::channel::mpsc::UnboundedReceiver;
use futures::future::{Either, select};
use futures::{SinkExt, StreamExt};
use gloo_net::websocket::{Message, futures::WebSocket};
use gloo_timers::future::{IntervalStream, TimeoutFuture};

use super::backoff::{Addresses, Backoff, NEXT_ADDRESS_MS};
use super::frames::{Frame, Splitter};
use super::session::{Credentials, Output, Phase, Session, SessionError, TICK_MS};
use super::{ConnState, Event, Outgoing, client_id};
use crate::log;

/// Starts the client on `urls` (the first, then the others in turn when it is lost); it runs
/// for the life of the page, or until a login is refused.
pub fn spawn(
    urls: Addresses,
    filters: Vec<String>,
    credentials: Option<Credentials>,
    outgoing: UnboundedReceiver<Outgoing>,
    on_event: impl Fn(Event) + 'static,
) {
    wasm_bindgen_futures::spawn_local(run(urls, filters, credentials, outgoing, on_event));
}

/// How one connection ended.
enum Ended {
    /// Worth retrying: the broker was unreachable or the link dropped.
    Dropped(String),
    /// The broker turned the login away: retrying with the same credentials cannot help.
    Refused(String),
}

/// What survives reconnections.
struct Link<'a> {
    urls: Addresses,
    filters: &'a [String],
    credentials: Option<&'a Credentials>,
    outgoing: UnboundedReceiver<Outgoing>,
    /// Publishes taken from `outgoing` while not subscribed, sent once subscribed.
    pending: Vec<Outgoing>,
}

async fn run(
    urls: Addresses,
    filters: Vec<String>,
    credentials: Option<Credentials>,
    outgoing: UnboundedReceiver<Outgoing>,
    on_event: impl Fn(Event),
) {
    let mut backoff = Backoff::for_addresses(urls.count());
    let mut link = Link {
        urls,
        filters: &filters,
        credentials: credentials.as_ref(),
        outgoing,
        pending: Vec::new(),
    };
    loop {
        on_event(Event::State(ConnState::Connecting));
        let ended = connect_once(&mut link, &on_event, &mut backoff).await;
        on_event(Event::State(ConnState::Disconnected));
        match ended {
            Ended::Refused(why) if link.credentials.is_some() => {
                let url = link.urls.current();
                log::warn(&format!("renkei: MQTT login at {url} refused ({why})"));
                on_event(Event::Refused(why));
                return;
            }
            Ended::Refused(why) | Ended::Dropped(why) => {
                let url = link.urls.current().to_owned();
                let delay = if link.urls.dropped() {
                    backoff.next_delay_ms(js_sys::Math::random())
                } else {
                    NEXT_ADDRESS_MS
                };
                log::warn(&format!(
                    "renkei: MQTT connection to {url} ended ({why}); trying {} in {delay} ms",
                    link.urls.current()
                ));
                TimeoutFuture::new(delay).await;
            }
        }
    }
}

/// One connection from open to close.
async fn connect_once(
    link: &mut Link<'_>,
    on_event: &impl Fn(Event),
    backoff: &mut Backoff,
) -> Ended {
    let mut ws = match WebSocket::open_with_protocol(link.urls.current(), "mqtt") {
        Ok(ws) => ws,
        Err(e) => return Ended::Dropped(format!("cannot open: {e}")),
    };
    let (mut session, connect) = match Session::open(
        &client_id(
            link.credentials.map(|c| c.user.as_str()),
            js_sys::Math::random(),
        ),
        link.filters,
        link.credentials,
        now_ms(),
    ) {
        Ok(s) => s,
        Err(e) => return Ended::Dropped(e.to_string()),
    };
    // Waits for the socket to open; an unreachable broker fails here.
    if let Err(e) = ws.send(Message::Bytes(connect.to_vec())).await {
        return Ended::Dropped(format!("cannot send CONNECT: {e}"));
    }
    // The broker answers a refused login with a CONNACK that says why (Renkei's, Mosquitto,
    // NATS). A close before any CONNACK is not a refusal: a cluster node that cannot reach
    // its session store closes the connection without one, and the next address may serve.
    let closed = |session: &Session, why: String| {
        Ended::Dropped(if session.phase() == Phase::AwaitingConnAck {
            format!("connection closed before the broker accepted it ({why})")
        } else {
            why
        })
    };
    let mut splitter = Splitter::new();
    let mut tick = IntervalStream::new(TICK_MS);
    let mut outputs = Vec::new();
    loop {
        let woken = select(select(ws.next(), tick.next()), link.outgoing.next()).await;
        let bytes = match woken {
            Either::Left((Either::Left((Some(Ok(Message::Bytes(bytes))), _)), _)) => bytes,
            Either::Left((Either::Left((Some(Ok(Message::Text(_))), _)), _)) => {
                return Ended::Dropped("broker sent a text frame".into());
            }
            Either::Left((Either::Left((Some(Err(e)), _)), _)) => {
                return closed(&session, e.to_string());
            }
            Either::Left((Either::Left((None, _)), _)) => {
                return closed(&session, "socket closed".into());
            }
            Either::Left((Either::Right(_), _)) => match session.on_tick(now_ms()) {
                Ok(Some(ping)) => {
                    if let Err(e) = ws.send(Message::Bytes(ping.to_vec())).await {
                        return Ended::Dropped(e.to_string());
                    }
                    continue;
                }
                Ok(None) => continue,
                Err(e) => return Ended::Dropped(e.to_string()),
            },
            Either::Right((Some(message), _)) => {
                link.pending.push(message);
                if session.phase() == Phase::Subscribed
                    && let Err(e) = flush(&mut session, &mut ws, &mut link.pending).await
                {
                    return Ended::Dropped(e);
                }
                continue;
            }
            // The sender lives as long as the page; nothing more will be published.
            Either::Right((None, _)) => continue,
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
                Err(e) => return Ended::Dropped(format!("MQTT stream out of step: {:?}", e.0)),
            };
            let phase = session.phase();
            match session.on_packet(packet, now_ms(), &mut outputs) {
                Ok(()) => {}
                Err(e @ SessionError::Refused(_)) => return Ended::Refused(e.to_string()),
                Err(e) => return Ended::Dropped(format!("{e} (while {phase:?})")),
            }
            for output in outputs.drain(..) {
                match output {
                    Output::Send(bytes) => {
                        if let Err(e) = ws.send(Message::Bytes(bytes.to_vec())).await {
                            return Ended::Dropped(e.to_string());
                        }
                    }
                    Output::Subscribed => {
                        backoff.reset();
                        link.urls.connected();
                        on_event(Event::State(ConnState::Connected));
                        if let Err(e) = flush(&mut session, &mut ws, &mut link.pending).await {
                            return Ended::Dropped(e);
                        }
                    }
                    Output::Deliver(message) => on_event(Event::Message(message)),
                }
            }
        }
    }
}

/// Sends the waiting publishes, oldest first; on failure the unsent ones stay waiting.
async fn flush(
    session: &mut Session,
    ws: &mut WebSocket,
    pending: &mut Vec<Outgoing>,
) -> Result<(), String> {
    while let Some(message) = pending.first() {
        let bytes = session
            .publish(&message.topic, &message.payload)
            .map_err(|e| e.to_string())?;
        ws.send(Message::Bytes(bytes.to_vec()))
            .await
            .map_err(|e| e.to_string())?;
        pending.remove(0);
    }
    Ok(())
}

/// The session's clock: the one wall clock of the protocol, in the session's f64 milliseconds.
fn now_ms() -> f64 {
    renkei_shared::Timestamp::now().0 as f64
}
