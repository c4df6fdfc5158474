//! An MQTT 3.1.1 client on rumqttc for tests: its event loop runs in a task, and the test reads
//! what arrived (SUBACKs, publishes, the end of the connection) when it wants to.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::broker::client_id_for;
use crate::wait::PATIENCE;

/// Options for a client of the MQTT listener at `addr` (keep alive 5 s, packets large enough
/// for the JSON mirror).
pub fn options(addr: SocketAddr, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    // JSON mirror messages are a few times larger than their postcard form.
    options.set_max_packet_size(256 * 1024, 64 * 1024);
    options
}

/// [`options`] with a login.
pub fn login_options(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> MqttOptions {
    let mut options = options(addr, client_id);
    options.set_credentials(user, password);
    options
}

/// Connects and returns the CONNACK's refusal code, or `None` if the broker accepted.
pub async fn refusal(options: MqttOptions) -> Option<ConnectReturnCode> {
    let (_client, mut eventloop) = AsyncClient::new(options, 8);
    match tokio::time::timeout(PATIENCE, eventloop.poll())
        .await
        .expect("an answer in time")
    {
        Ok(Event::Incoming(Packet::ConnAck(_))) => None,
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Some(code),
        other => panic!("neither a CONNACK nor a refusal: {other:?}"),
    }
}

/// A connected MQTT client whose event loop runs in a task.
#[derive(Debug)]
pub struct MqttClient {
    pub client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<Packet>,
    /// Publishes that arrived while waiting for something else.
    early: VecDeque<Publish>,
}

/// Publishes a Renkei message on its own topic, retained, at QoS 1, as agents send, through
/// any rumqttc client; false if it cannot be encoded or the client's event loop has ended.
pub async fn send_on(client: &AsyncClient, env: &renkei_shared::Envelope) -> bool {
    let (Ok(topic), Ok(payload)) = (renkei_shared::Topic::of(env), renkei_shared::encode(env))
    else {
        return false;
    };
    client
        .publish(topic.to_string(), QoS::AtLeastOnce, true, payload)
        .await
        .is_ok()
}

impl MqttClient {
    /// Connects anonymously (a broker in demo mode, Mosquitto) and waits for the CONNACK.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> MqttClient {
        MqttClient::try_connect(options(addr, client_id))
            .await
            .unwrap_or_else(|e| panic!("{client_id} cannot connect: {e}"))
    }

    /// Connects as a user, under the client id [`client_id_for`] gives it, and waits for the
    /// CONNACK.
    pub async fn connect_as(addr: SocketAddr, user: &str, password: &str) -> MqttClient {
        MqttClient::try_connect(login_options(addr, &client_id_for(user), user, password))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
    }

    /// Connects with `options`; the error if the broker does not answer with a CONNACK.
    pub async fn try_connect(options: MqttOptions) -> Result<MqttClient, String> {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let event = tokio::time::timeout(PATIENCE, eventloop.poll())
            .await
            .expect("an answer in time")
            .map_err(|e| e.to_string())?;
        assert!(
            matches!(event, Event::Incoming(Packet::ConnAck(_))),
            "{event:?}"
        );
        let (tx, incoming) = mpsc::unbounded_channel();
        tokio::spawn(drive(eventloop, tx));
        Ok(MqttClient {
            client,
            incoming,
            early: VecDeque::new(),
        })
    }

    /// Subscribes and waits for the SUBACK, so that what is published next is seen.
    pub async fn subscribe(&mut self, filter: &str) {
        self.subscribe_codes(filter).await;
    }

    /// Subscribes and returns the SUBACK's return codes.
    pub async fn subscribe_codes(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.subscribe_codes_at(filter, QoS::AtLeastOnce).await
    }

    /// [`MqttClient::subscribe_codes`] at `qos` (the dashboard subscribes at QoS 0).
    pub async fn subscribe_codes_at(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        self.suback().await
    }

    /// Subscribes to `filters` in one SUBSCRIBE and returns the SUBACK's return codes.
    pub async fn subscribe_many_codes(
        &mut self,
        filters: impl IntoIterator<Item = String>,
    ) -> Vec<SubscribeReasonCode> {
        let filters = filters
            .into_iter()
            .map(|path| rumqttc::SubscribeFilter::new(path, QoS::AtLeastOnce));
        self.client.subscribe_many(filters).await.unwrap();
        self.suback().await
    }

    async fn suback(&mut self) -> Vec<SubscribeReasonCode> {
        loop {
            match self.next_packet().await {
                Packet::SubAck(ack) => return ack.return_codes,
                Packet::Publish(p) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// Publishes a Renkei message on its own topic, retained, at QoS 1, as agents send.
    pub async fn send(&self, env: &renkei_shared::Envelope) {
        assert!(send_on(&self.client, env).await, "cannot send {env:?}");
    }

    /// As [`MqttClient::send`], but false instead of a panic when the connection has ended
    /// (an engine that closes connections, as NATS does while its streams elect leaders).
    pub async fn try_send(&self, env: &renkei_shared::Envelope) -> bool {
        send_on(&self.client, env).await
    }

    /// The payload of the next publish on `topic` within `wait`, skipping others.
    pub async fn publish_on(&mut self, topic: &str, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        while let Some(p) = self.publish_by(deadline).await {
            if p.topic == topic {
                return Some(p.payload.to_vec());
            }
        }
        None
    }

    /// The next publish received, within [`PATIENCE`].
    pub async fn next_publish(&mut self) -> Publish {
        if let Some(p) = self.early.pop_front() {
            return p;
        }
        loop {
            if let Packet::Publish(p) = self.next_packet().await {
                return p;
            }
        }
    }

    /// The next publish if one arrives within `wait`.
    pub async fn publish_within(&mut self, wait: Duration) -> Option<Publish> {
        if let Some(p) = self.early.pop_front() {
            return Some(p);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next publish if one arrives by `deadline`; panics if the connection ends first
    /// (a test that expects it to end asks [`MqttClient::closed_within`]).
    pub async fn publish_by(&mut self, deadline: tokio::time::Instant) -> Option<Publish> {
        if let Some(p) = self.early.pop_front() {
            return Some(p);
        }
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the connection to the broker ended"),
                Err(_) => return None,
            }
        }
    }

    /// Whether the event loop has ended (the broker closed the connection) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => self.early.push_back(p),
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    async fn next_packet(&mut self) -> Packet {
        tokio::time::timeout(PATIENCE, self.incoming.recv())
            .await
            .expect("a packet in time")
            .expect("event loop running")
    }
}

async fn drive(mut eventloop: EventLoop, incoming: mpsc::UnboundedSender<Packet>) {
    while let Ok(event) = eventloop.poll().await {
        if let Event::Incoming(packet) = event
            && incoming.send(packet).is_err()
        {
            return;
        }
    }
}

/// Opens a WebSocket to the MQTT-over-WebSocket listener at `addr` as a browser does (path
/// `/mqtt`, subprotocol `mqtt`, RFC 6455's example key): the socket and the answer's head.
pub async fn websocket_upgrade(addr: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}
