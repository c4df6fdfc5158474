//! The load tool's own QoS 1 publisher (`--client lean`, the default).
//!
//! The load tool runs on the same machine as the broker it measures, so every CPU cycle its
//! publishers spend is taken from the broker. rumqttc's event loop (0.25) writes and flushes
//! each PUBLISH with its own `writev`, and allocates a timer and a timeout for every request it
//! polls; with 2,000 publishers that was a third of the machine's CPU during an ingest run
//! (`perf record -a`, BENCHMARKS.md section 1). This publisher keeps the same session (clean
//! session, receipts subscribed before the first publish, up to [`WINDOW`] messages in flight,
//! PUBACKs to the receipts it receives) but writes everything its window allows in one write.
//!
//! Packets are encoded and parsed by rumqttc's `mqttbytes`; only the session loop is written
//! here, because no MQTT client crate offers a publisher that batches its writes.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use renkei_shared::{Receipt, WARDS};
use rumqttc::mqttbytes::{self, QoS, v4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Publishers, WINDOW, message};

/// Largest packet the publisher accepts from the broker (receipts are a few hundred bytes).
/// Free space each read of a publisher's socket asks for: a window of acknowledgements.
const READ_ROOM: usize = 16 * 1024;

const MAX_INCOMING: usize = 64 * 1024;

/// Connections a publisher makes before it gives up.
const ATTEMPTS: u32 = 5;

/// The packet id of the receipts SUBSCRIBE; PUBLISH ids stay below it.
const SUBSCRIBE_PKID: u16 = u16::MAX;

/// Publisher `p`: connects, publishes its messages and waits for their PUBACKs and, when
/// `receipt_filter` is given, for the receipts naming them. Reconnects after a broken connection
/// and sends again what was in flight, as QoS 1 asks. Returns how many PUBACKs it received.
pub async fn publish(shared: &Publishers, p: usize, receipt_filter: Option<String>) -> u64 {
    let mut session = Session::new(shared, p, receipt_filter);
    for attempt in 1..=ATTEMPTS {
        match session.connection().await {
            Ok(()) => break,
            Err(e) if attempt < ATTEMPTS => {
                eprintln!("publisher {p}: {e:#}; connecting again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => eprintln!("publisher {p}: {e:#}; giving up"),
        }
    }
    session.acks
}

/// One publisher's progress, kept across connections.
struct Session<'a> {
    shared: &'a Publishers,
    p: usize,
    receipt_filter: Option<String>,
    /// Next sequence never sent.
    next_seq: u64,
    /// Sequences to send again, after a broken connection, before `next_seq`.
    resend: VecDeque<u64>,
    /// Sent and not yet acknowledged: (packet id, sequence), oldest first.
    inflight: VecDeque<(u16, u64)>,
    next_pkid: u16,
    acks: u64,
    confirmed: u64,
    /// A paced publisher's ticks (none: as fast as the window allows).
    pacer: Option<tokio::time::Interval>,
}

impl<'a> Session<'a> {
    fn new(shared: &'a Publishers, p: usize, receipt_filter: Option<String>) -> Self {
        Session {
            shared,
            p,
            receipt_filter,
            next_seq: 1,
            resend: VecDeque::new(),
            inflight: VecDeque::new(),
            next_pkid: 1,
            acks: 0,
            confirmed: 0,
            pacer: None,
        }
    }

    fn done(&self) -> bool {
        self.acks >= self.shared.messages
            && (self.receipt_filter.is_none() || self.confirmed >= self.shared.messages)
    }

    fn has_more(&self) -> bool {
        !self.resend.is_empty() || self.next_seq <= self.shared.messages
    }

    /// One connection: returns `Ok` when the publisher is done, or gave up waiting for
    /// receipts; an error when the connection broke or the broker refused it.
    async fn connection(&mut self) -> Result<()> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.shared.port))
            .await
            .context("connect")?;
        stream.set_nodelay(true)?;
        let (mut rbuf, mut wbuf) = (BytesMut::with_capacity(4096), BytesMut::with_capacity(4096));

        let ward = WARDS[self.p % WARDS.len()].code;
        let mut connect = v4::Connect::new(format!("agent-{ward}-bench-{:05}", self.p));
        connect.keep_alive = 60;
        connect.write(&mut wbuf)?;
        // Subscribed to the site's receipts before the first publish, as an agent is.
        if let Some(filter) = &self.receipt_filter {
            v4::Subscribe::new(filter.clone(), QoS::AtLeastOnce).write(&mut wbuf)?;
        }
        stream.write_all(&wbuf).await.context("write CONNECT")?;
        wbuf.clear();
        match self.read_packet(&mut stream, &mut rbuf).await? {
            v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {}
            v4::Packet::ConnAck(ack) => bail!("broker refused the connection: {:?}", ack.code),
            other => bail!("expected CONNACK, got {other:?}"),
        }
        // A paced publisher starts once connected: a realistic site publishes over a live link,
        // and the connection storm is measured by the unpaced runs.
        if self.pacer.is_none() {
            self.pacer = self.shared.pacer(self.p);
        }
        // What the broken connection had in flight goes first, in order.
        while let Some((_, seq)) = self.inflight.pop_back() {
            self.resend.push_front(seq);
        }

        loop {
            if self.pacer.is_none() {
                while self.inflight.len() < usize::from(WINDOW) && self.has_more() {
                    self.queue_next(&mut wbuf)?;
                }
            }
            if !wbuf.is_empty() {
                stream.write_all(&wbuf).await.context("write")?;
                wbuf.clear();
            }
            if self.done() {
                let _ = v4::Disconnect.write(&mut wbuf);
                let _ = stream.write_all(&wbuf).await;
                return Ok(());
            }
            let may_send = self.has_more() && self.inflight.len() < usize::from(WINDOW);
            let idle = self.shared.idle;
            tokio::select! {
                _ = tick(&mut self.pacer), if may_send && self.pacer.is_some() => {
                    self.queue_next(&mut wbuf)?;
                }
                read = tokio::time::timeout(idle, read_more(&mut stream, &mut rbuf, READ_ROOM)) => {
                    match read {
                        Ok(read) => read?,
                        // Every PUBACK is in and the receipts stopped coming: what is missing
                        // is counted as never confirmed.
                        Err(_) if self.acks >= self.shared.messages => return Ok(()),
                        Err(_) => bail!("nothing from the broker for {idle:?}"),
                    }
                    while let Some(packet) = parse(&mut rbuf)? {
                        self.on_packet(packet, &mut wbuf)?;
                    }
                }
            }
        }
    }

    /// Encodes the next message (one to send again first) into `wbuf`.
    fn queue_next(&mut self, wbuf: &mut BytesMut) -> Result<()> {
        let (seq, resent) = match self.resend.pop_front() {
            Some(seq) => (seq, true),
            None => {
                self.next_seq += 1;
                (self.next_seq - 1, false)
            }
        };
        let (topic, payload) = message(self.p, seq)?;
        let pkid = self.next_pkid;
        self.next_pkid = if pkid >= SUBSCRIBE_PKID - 1 {
            1
        } else {
            pkid + 1
        };
        let publish = v4::Publish {
            dup: resent,
            qos: QoS::AtLeastOnce,
            retain: topic.retained(),
            topic: topic.to_string(),
            pkid,
            payload: payload.into(),
        };
        publish.write(wbuf)?;
        self.shared.mark_sent(self.p, seq);
        self.inflight.push_back((pkid, seq));
        Ok(())
    }

    fn on_packet(&mut self, packet: v4::Packet, wbuf: &mut BytesMut) -> Result<()> {
        match packet {
            v4::Packet::PubAck(ack) => {
                // Brokers acknowledge in order; a PUBACK for an id not in flight (a copy of one
                // sent again) is ignored.
                if let Some(i) = self.inflight.iter().position(|&(id, _)| id == ack.pkid) {
                    self.inflight.remove(i);
                    self.acks += 1;
                }
            }
            v4::Packet::SubAck(ack) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                {
                    eprintln!("publisher {}: the broker refused the receipts", self.p);
                }
            }
            v4::Packet::Publish(publish) => {
                if publish.qos != QoS::AtMostOnce {
                    v4::PubAck::new(publish.pkid).write(wbuf)?;
                }
                if self.receipt_filter.as_deref() == Some(publish.topic.as_str()) {
                    match Receipt::decode(&publish.payload) {
                        Ok(receipt) => self.confirmed += self.shared.on_receipt(self.p, &receipt),
                        Err(_) => eprintln!("publisher {}: a receipt that does not decode", self.p),
                    }
                }
            }
            v4::Packet::PingResp => {}
            other => bail!("unexpected packet from the broker: {other:?}"),
        }
        Ok(())
    }

    /// Reads until one whole packet is in `rbuf` and returns it.
    async fn read_packet(&self, stream: &mut TcpStream, rbuf: &mut BytesMut) -> Result<v4::Packet> {
        loop {
            if let Some(packet) = parse(rbuf)? {
                return Ok(packet);
            }
            tokio::time::timeout(self.shared.idle, read_more(stream, rbuf, READ_ROOM))
                .await
                .context("no CONNACK")??;
        }
    }
}

/// The next tick of a paced publisher's pacer (never, for an unpaced one).
async fn tick(pacer: &mut Option<tokio::time::Interval>) {
    match pacer {
        Some(pacer) => {
            pacer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Reads what the socket has (into at least `room` bytes of free space); an error when the
/// broker closed the connection.
pub(crate) async fn read_more(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    room: usize,
) -> Result<()> {
    rbuf.reserve(room);
    match stream.read_buf(rbuf).await.context("read")? {
        0 => bail!("the broker closed the connection"),
        _ => Ok(()),
    }
}

/// The next whole packet in `rbuf`, if one is there.
pub(crate) fn parse(rbuf: &mut BytesMut) -> Result<Option<v4::Packet>> {
    match v4::Packet::read(rbuf, MAX_INCOMING) {
        Ok(packet) => Ok(Some(packet)),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e).context("a malformed packet from the broker"),
    }
}
