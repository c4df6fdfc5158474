//! The HTTP listener against clients that hold connections without finishing anything:
//! slowloris request heads, idle kept-alive connections, more connections than the cap, and
//! a client that stops reading its response. The broker's open descriptors are counted in
//! `/proc/<pid>/fd`.

use std::time::{Duration, Instant};

use renkei_testkit::net::closed_by;
use renkei_testkit::{BrokerProcess, PATIENCE, ROOT, eventually, http_get, http_get_as};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The header timeout of the slowloris tests: long enough for the API calls made while the
/// slow connections are open, short enough to wait for.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const HEADER_TIMEOUT_CONFIG: &str = "[http]\nheader_read_timeout = \"5s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_neither_starve_the_api_nor_outlive_the_header_timeout() {
    const SLOW: usize = 500;
    let broker = BrokerProcess::start_with_users(HEADER_TIMEOUT_CONFIG);
    let addrs = broker.addrs;
    let before = broker.open_fds();

    let opened = Instant::now();
    let mut readers = Vec::with_capacity(SLOW);
    // The silent half keeps its write halves: dropping one would send FIN.
    let mut silent = Vec::with_capacity(SLOW / 2);
    for i in 0..SLOW {
        let (read, mut write) = TcpStream::connect(addrs.http).await.unwrap().into_split();
        readers.push(read);
        if i % 2 == 0 {
            silent.push(write);
            continue;
        }
        // The other half starts a request and sends one byte of a header every 200 ms, never
        // ending the head.
        tokio::spawn(async move {
            if write
                .write_all(b"GET /api/v1/state HTTP/1.1\r\nHost: renkei\r\n")
                .await
                .is_err()
            {
                return;
            }
            for byte in b"X-Slow: 1\r\n".iter().cycle() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
            }
        });
    }
    eventually("the broker to hold every slow connection", || async {
        (broker.open_fds() >= before + SLOW).then_some(())
    })
    .await;

    let asked = Instant::now();
    let health = http_get(addrs.http, "/healthz").await;
    let health_took = asked.elapsed();
    assert_eq!(health.status, 200);
    let asked = Instant::now();
    let state = http_get_as(addrs.http, "/api/v1/state", ROOT).await;
    let state_took = asked.elapsed();
    assert_eq!(state.status, 200, "{}", state.text());
    assert!(
        health_took < Duration::from_secs(1) && state_took < Duration::from_secs(1),
        "with {SLOW} slow connections open: /healthz took {health_took:?}, /api/v1/state \
         {state_took:?}"
    );
    assert!(
        broker.open_fds() >= before + SLOW,
        "the slow connections were still open while the API answered"
    );

    // Every slow connection is closed once the header timeout has passed, and not long after.
    let deadline = opened + HEADER_TIMEOUT + Duration::from_secs(3);
    let mut open = 0;
    for read in &mut readers {
        if !closed_by(read, deadline).await {
            open += 1;
        }
    }
    assert_eq!(
        open,
        0,
        "slow connections still open {:?} after the first was made",
        opened.elapsed()
    );
    assert!(
        opened.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(500),
        "closed before the header timeout: {:?}",
        opened.elapsed()
    );
    eventually(
        "the broker's descriptors back to where they were",
        || async { (broker.open_fds() <= before + 5).then_some(()) },
    )
    .await;
    drop(silent);
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let broker = BrokerProcess::start_demo(HEADER_TIMEOUT_CONFIG);
    let (mut read, mut write) = TcpStream::connect(broker.addrs.http)
        .await
        .unwrap()
        .into_split();
    // One whole request, kept alive (HTTP/1.1's default), and its whole response.
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: renkei\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\nok") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, read.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(n, 0, "closed before the response");
        response.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    assert!(
        closed_by(
            &mut read,
            answered + HEADER_TIMEOUT + Duration::from_secs(2)
        )
        .await,
        "an idle kept-alive connection still open after {:?}",
        answered.elapsed()
    );
    assert!(
        answered.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(500),
        "the kept-alive connection was closed after {:?}, before the timeout",
        answered.elapsed()
    );
    drop(write);
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_bounds_the_brokers_open_descriptors() {
    const CAP: usize = 50;
    const FLOOD: usize = 300;
    let broker =
        BrokerProcess::start_demo("[http]\nmax_connections = 50\nheader_read_timeout = \"1s\"\n");
    let before = broker.open_fds();

    // Connections that never send a byte; the kernel completes the handshake of those the
    // broker has not accepted yet, and they wait in its queue.
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(broker.addrs.http).await.unwrap());
    }
    let mut most = 0;
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        most = most.max(broker.open_fds());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        most <= before + CAP + 10,
        "{FLOOD} connections against a cap of {CAP}: the broker had {most} descriptors open, \
         {before} before"
    );
    // The queued ones are accepted as earlier ones time out, and time out in turn.
    let deadline = Instant::now() + PATIENCE;
    let mut open = 0;
    for stream in flood {
        let (mut read, write) = stream.into_split();
        if !closed_by(&mut read, deadline).await {
            open += 1;
        }
        drop(write);
    }
    assert_eq!(open, 0, "connections never served nor closed");
    assert_eq!(http_get(broker.addrs.http, "/healthz").await.status, 200);
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_cut_off_after_the_idle_timeout() {
    const SIZE: usize = 16 * 1024 * 1024;
    let broker = BrokerProcess::start_demo("[http]\nidle_timeout = \"1s\"\n");
    std::fs::write(broker.dir.path().join("dist/big.bin"), vec![7u8; SIZE]).unwrap();

    // A small receive window, so that the response stalls in the kernel's buffers at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(broker.addrs.http).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"GET /big.bin HTTP/1.1\r\nHost: renkei\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // What the broker had sent before it gave up arrives, then the end.
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + PATIENCE;
    // (The head adds to what is counted: all of it is the whole file and more.)
    while received < SIZE {
        match tokio::time::timeout_at(deadline.into(), read.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received += n,
            Err(_) => panic!("neither the whole response nor the end in time"),
        }
    }
    assert!(
        received < SIZE,
        "the stalled client got all {received} bytes: the connection was kept"
    );
    drop(write);
    assert_eq!(http_get(broker.addrs.http, "/healthz").await.status, 200);
    assert!(broker.terminate().success());
}
