//! Splits the WebSocket byte stream into MQTT packets.
//!
//! A WebSocket message may hold several MQTT packets, or part of one, so bytes are appended to a
//! buffer and decoded in a loop until mqttbytes reports `InsufficientBytes`. A packet larger
//! than the limit is skipped whole (its bytes are counted off as they arrive) instead of ending
//! the connection: a retained oversize message would otherwise be redelivered on every
//! reconnect and keep the dashboard offline.

use bytes::{Buf, BytesMut};
use mqttbytes::v4::{self, Packet};

/// Largest MQTT packet (remaining length) the dashboard reads. Renkei frames are at most
/// 16 KiB plus a topic; anything much larger is not ours.
pub const MAX_PACKET: usize = 64 * 1024;

/// What the splitter found in the stream.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Packet(Packet),
    /// A packet over [`MAX_PACKET`] bytes, skipped.
    Oversize(usize),
    /// A packet that framed correctly but did not decode; the stream stays in step.
    Invalid(mqttbytes::Error),
}

/// The stream cannot be framed any more (a corrupt length): the connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desync(pub mqttbytes::Error);

/// Buffers the incoming bytes of one connection.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: BytesMut,
    /// Bytes of an oversize packet still to drop as they arrive.
    skip: usize,
}

impl Splitter {
    pub fn new() -> Self {
        Splitter::default()
    }

    /// Appends bytes received from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        let dropped = self.skip.min(bytes.len());
        self.skip -= dropped;
        self.buf.extend_from_slice(&bytes[dropped..]);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Desync> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match v4::read(&mut self.buf, MAX_PACKET) {
            Ok(packet) => Ok(Some(Frame::Packet(packet))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(mqttbytes::Error::PayloadSizeLimitExceeded(remaining)) => {
                // The fixed header parsed, so its length bytes are all in the buffer.
                let frame = header_len(&self.buf) + remaining;
                let now = frame.min(self.buf.len());
                self.buf.advance(now);
                self.skip = frame - now;
                Ok(Some(Frame::Oversize(remaining)))
            }
            Err(e @ mqttbytes::Error::MalformedRemainingLength) => Err(Desync(e)),
            // mqttbytes splits a framed packet off the buffer before decoding its body, so any
            // other error leaves the stream at the next packet.
            Err(e) => Ok(Some(Frame::Invalid(e))),
        }
    }

    /// Bytes buffered but not yet framed.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Length of the fixed header at the start of `buf`: one type byte and 1–4 length bytes.
fn header_len(buf: &[u8]) -> usize {
    1 + buf
        .iter()
        .skip(1)
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use mqttbytes::QoS;
    use mqttbytes::v4::{PingResp, Publish};

    use super::*;

    fn publish(topic: &str, payload: &[u8], pkid: u16) -> Vec<u8> {
        let mut p = Publish::from_bytes(topic, QoS::AtLeastOnce, Bytes::copy_from_slice(payload));
        p.pkid = pkid;
        let mut buf = BytesMut::new();
        p.write(&mut buf).unwrap();
        buf.to_vec()
    }

    fn drain(s: &mut Splitter) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = s.next_frame().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn several_packets_in_one_message() {
        let mut bytes = publish("renkei/v1/a", b"one", 1);
        bytes.extend(publish("renkei/v1/b", b"two", 2));
        let mut ping = BytesMut::new();
        PingResp.write(&mut ping).unwrap();
        bytes.extend_from_slice(&ping);
        let mut s = Splitter::new();
        s.push(&bytes);
        let frames = drain(&mut s);
        assert_eq!(frames.len(), 3);
        assert!(
            matches!(&frames[0], Frame::Packet(Packet::Publish(p)) if p.pkid == 1 && &p.payload[..] == b"one")
        );
        assert!(
            matches!(&frames[1], Frame::Packet(Packet::Publish(p)) if p.topic == "renkei/v1/b")
        );
        assert_eq!(frames[2], Frame::Packet(Packet::PingResp));
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_packet_split_across_messages_at_every_point() {
        let bytes = publish("renkei/v1/131041/site/status", &[7; 300], 9);
        for cut in 0..bytes.len() {
            let mut s = Splitter::new();
            s.push(&bytes[..cut]);
            assert!(drain(&mut s).is_empty(), "cut {cut}");
            s.push(&bytes[cut..]);
            let frames = drain(&mut s);
            assert!(
                matches!(&frames[..], [Frame::Packet(Packet::Publish(p))] if p.payload.len() == 300),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut bytes = publish("t/1", b"x", 1);
        bytes.extend(publish("t/2", b"y", 2));
        let mut s = Splitter::new();
        let mut frames = Vec::new();
        for b in &bytes {
            s.push(std::slice::from_ref(b));
            frames.extend(drain(&mut s));
        }
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn skips_an_oversize_packet_and_keeps_going() {
        let big = publish("t/big", &vec![1; MAX_PACKET + 10], 1);
        let small = publish("t/small", b"ok", 2);
        let mut s = Splitter::new();
        // The big packet arrives in pieces, the next one right after its tail.
        s.push(&big[..1000]);
        assert!(matches!(drain(&mut s)[..], [Frame::Oversize(_)]));
        s.push(&big[1000..40_000]);
        assert!(drain(&mut s).is_empty());
        let mut tail = big[40_000..].to_vec();
        tail.extend(&small);
        s.push(&tail);
        let frames = drain(&mut s);
        assert!(matches!(&frames[..], [Frame::Packet(Packet::Publish(p))] if p.topic == "t/small"));
    }

    #[test]
    fn an_undecodable_packet_does_not_desync() {
        // A QoS 1 publish with packet id 0 frames but does not decode.
        let mut bad = publish("t/a", b"x", 1);
        let id_at = 2 + 2 + 3; // fixed header, topic length, topic
        bad[id_at] = 0;
        bad[id_at + 1] = 0;
        bad.extend(publish("t/b", b"y", 3));
        let mut s = Splitter::new();
        s.push(&bad);
        let frames = drain(&mut s);
        assert_eq!(frames[0], Frame::Invalid(mqttbytes::Error::PacketIdZero));
        assert!(matches!(&frames[1], Frame::Packet(Packet::Publish(p)) if p.topic == "t/b"));
    }

    #[test]
    fn a_corrupt_length_is_a_desync() {
        let mut s = Splitter::new();
        s.push(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(s.next_frame().is_err());
    }

    #[test]
    fn header_lengths() {
        assert_eq!(header_len(&[0x30, 0x05]), 2);
        assert_eq!(header_len(&[0x30, 0x80, 0x01]), 3);
        assert_eq!(header_len(&[0x30, 0x80, 0x80, 0x80, 0x01]), 5);
    }
}
