//! The staff web form's defences, tried against the real server on an ephemeral port with a
//! real HTTP client (hyper's) and raw sockets (the test kit's): what a hostile page, a guessing
//! phone and slow clients can and cannot do. No broker is needed: the form writes to the
//! outbox in-process.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use renkei_agent::form::{self, FormLimits, FormState};
use renkei_agent::link::LinkState;
use renkei_agent::outbox::Outbox;
use renkei_shared::{Body as Message, Id, Mode, SiteRef, WardCode};
use renkei_testkit::net::{closed_by, connect_from};
use renkei_testkit::{AgentProcess, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const PIN: &str = "246810";

/// A form server on 127.0.0.1 and a free port, stopped on drop.
struct Form {
    addr: SocketAddr,
    outbox: Arc<Outbox>,
    client: Client<HttpConnector, Body>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Drop for Form {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// One response: status, headers and the body as text.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Form {
    async fn start(pin: Option<&str>, limits: FormLimits, hosts: &[&str]) -> Form {
        let dir = tempfile::tempdir().expect("a temp dir");
        let outbox = Arc::new(Outbox::open(&dir.path().join("state"), 1 << 20).expect("an outbox"));
        outbox
            .lock()
            .expect("the outbox")
            .new_boot()
            .expect("a boot");
        let (_link_tx, link) = watch::channel(LinkState::Connected);
        let state = FormState {
            outbox: outbox.clone(),
            site: SiteRef {
                ward: WardCode(131041),
                site: Id::new("nishi-shinjuku-es".to_owned()).expect("a site id"),
            },
            name: "西新宿小学校".into(),
            mode: Mode::Exercise,
            pin: pin.map(str::to_owned),
            link,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            limits,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let addr = listener.local_addr().expect("its address");
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            form::serve(listener, state, shutdown)
                .await
                .expect("the form serves");
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        Form {
            addr,
            outbox,
            client,
            stop,
            _dir: dir,
        }
    }

    /// What a browser that loaded the page from this server sends as `Origin`.
    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("an answer within 10 s")
            .expect("an HTTP response");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(Body::new(response.into_body()), 1 << 20)
            .await
            .expect("the whole body");
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str, extra: &[(&str, &str)]) -> Reply {
        let mut request = Request::get(format!("http://{}{path}", self.addr));
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        self.send(request.body(Body::empty()).expect("a request"))
            .await
    }

    /// A url-encoded POST with `extra` headers (Origin, Referer, Host, …).
    async fn post(&self, path: &str, extra: &[(&str, &str)], form: &str) -> Reply {
        let mut request = Request::post(format!("http://{}{path}", self.addr))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        self.send(
            request
                .body(Body::from(form.to_owned()))
                .expect("a request"),
        )
        .await
    }

    /// GETs the page as a browser would and returns the token of its forms.
    async fn token(&self) -> String {
        let page = self.get("/", &[]).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        token_of(&page.body)
    }

    /// Evacuees of the newest shelter report in the outbox, if any.
    fn saved_evacuees(&self) -> Option<u32> {
        let latest = self.outbox.lock().expect("the outbox").latest();
        match latest.shelter.map(|e| e.body) {
            Some(Message::Shelter(s)) => s.evacuees,
            _ => None,
        }
    }
}

/// The CSRF token a rendered page carries (the same in each of its forms).
fn token_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page
        .find(marker)
        .unwrap_or_else(|| panic!("no CSRF token in the page:\n{page}"))
        + marker.len();
    let len = page[start..].find('"').expect("the token's end");
    page[start..start + len].to_owned()
}

fn shelter_form(evacuees: u32, pin: &str, token: &str) -> String {
    format!("evacuees={evacuees}&pin={pin}&csrf={token}")
}

fn short_limits() -> FormLimits {
    FormLimits {
        pin_window: Duration::from_secs(60),
        pin_lockout: Duration::from_millis(1500),
        token_ttl: Duration::from_secs(2),
        ..FormLimits::default()
    }
}

#[tokio::test]
async fn the_legitimate_flow_saves_the_report_to_the_outbox() {
    let form = Form::start(Some(PIN), FormLimits::default(), &[]).await;
    let page = form.get("/", &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    // Every form on the page carries the token.
    assert_eq!(
        page.body.matches("name=\"csrf\"").count(),
        3,
        "{}",
        page.body
    );
    // The page can be neither framed by another site nor kept in a cache.
    let h = |name: &str| {
        page.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(h("content-security-policy").contains("frame-ancestors 'none'"));
    assert!(h("content-security-policy").contains("form-action 'self'"));
    assert_eq!(h("x-frame-options"), "DENY");
    assert_eq!(h("cache-control"), "no-store");
    assert_eq!(h("referrer-policy"), "same-origin");

    let token = token_of(&page.body);
    let reply = form
        .post(
            "/report/shelter",
            &[("origin", &form.origin())],
            &shelter_form(321, PIN, &token),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(
        reply.body.contains("保存しました / saved (seq"),
        "{}",
        reply.body
    );
    assert_eq!(form.saved_evacuees(), Some(321));
    // A browser that sends no Origin sends its Referer, and that is checked instead.
    let referer = format!("{}/report/shelter", form.origin());
    let reply = form
        .post(
            "/report/shelter",
            &[("referer", &referer)],
            &shelter_form(322, PIN, &token_of(&reply.body)),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(form.saved_evacuees(), Some(322));
}

#[tokio::test]
async fn a_post_from_another_origin_is_refused() {
    let form = Form::start(Some(PIN), FormLimits::default(), &[]).await;
    let token = form.token().await;
    let body = shelter_form(500, PIN, &token);
    let evil_referer = "http://evil.example/attack.html";
    let other_port = format!("http://127.0.0.1:{}", form.addr.port() + 1);
    for (what, headers) in [
        ("another site", vec![("origin", "http://evil.example")]),
        (
            "another site, though the Referer is ours",
            vec![("origin", "http://evil.example"), ("referer", "x")],
        ),
        ("an opaque origin", vec![("origin", "null")]),
        ("another port", vec![("origin", other_port.as_str())]),
        ("a foreign Referer", vec![("referer", evil_referer)]),
        ("neither Origin nor Referer", vec![]),
    ] {
        let reply = form.post("/report/shelter", &headers, &body).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{what}: {}",
            reply.body
        );
        assert!(
            reply.body.contains("保存していません") && reply.body.contains("NOT saved"),
            "{what}: {}",
            reply.body
        );
        assert!(reply.body.contains("origin"), "{what}: {}", reply.body);
    }
    assert_eq!(form.saved_evacuees(), None, "nothing was stored");
}

#[tokio::test]
async fn a_post_without_a_token_is_refused() {
    let form = Form::start(Some(PIN), FormLimits::default(), &[]).await;
    let origin = form.origin();
    for body in [
        format!("evacuees=7&pin={PIN}"),
        format!("evacuees=7&pin={PIN}&csrf="),
    ] {
        let reply = form
            .post("/report/shelter", &[("origin", &origin)], &body)
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
        assert!(
            reply.body.contains("有効期限") && reply.body.contains("press Save again"),
            "{}",
            reply.body
        );
        // The form comes back filled in with a fresh token, so staff only press Save again.
        assert!(reply.body.contains("value=\"7\""), "{}", reply.body);
        assert!(!token_of(&reply.body).is_empty());
    }
    assert_eq!(form.saved_evacuees(), None);
}

#[tokio::test]
async fn a_stale_or_foreign_token_is_refused() {
    let form = Form::start(Some(PIN), short_limits(), &[]).await;
    let other = Form::start(Some(PIN), short_limits(), &[]).await;
    let origin = form.origin();
    let stale = form.token().await;
    let foreign = other.token().await;
    let mine = form.token().await;
    // One changed character of a good token (in its nonce, which the MAC covers).
    let mut tampered = mine.clone().into_bytes();
    let at = 20;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (what, token) in [
        ("another agent's", foreign.as_str()),
        ("tampered", tampered.as_str()),
        ("garbage", "not-a-token"),
    ] {
        let reply = form
            .post(
                "/report/shelter",
                &[("origin", &origin)],
                &shelter_form(11, PIN, token),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{what}: {}",
            reply.body
        );
        assert!(reply.body.contains("有効期限"), "{what}: {}", reply.body);
    }
    // Older than token_ttl (2 s here).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = form
        .post(
            "/report/shelter",
            &[("origin", &origin)],
            &shelter_form(12, PIN, &stale),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "stale: {}", reply.body);
    assert_eq!(form.saved_evacuees(), None);
    // The refusal's fresh token works.
    let reply = form
        .post(
            "/report/shelter",
            &[("origin", &origin)],
            &shelter_form(13, PIN, &token_of(&reply.body)),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(form.saved_evacuees(), Some(13));
}

#[tokio::test]
async fn a_host_the_form_does_not_serve_is_refused() {
    let form = Form::start(None, FormLimits::default(), &["renkei-nishi.local"]).await;
    let port = form.addr.port();
    // DNS rebinding: the attacker's name, resolving to this box, is sent as Host.
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port + 1),
        format!("10.1.2.3:{port}"),
        "".to_owned(),
    ] {
        let reply = form.get("/", &[("host", &host)]).await;
        assert_eq!(
            reply.status,
            StatusCode::MISDIRECTED_REQUEST,
            "Host {host:?}: {}",
            reply.body
        );
        assert!(reply.body.contains("form_hosts"), "{}", reply.body);
        let reply = form
            .post(
                "/report/shelter",
                &[("host", &host), ("origin", &format!("http://{host}"))],
                "evacuees=3&csrf=x",
            )
            .await;
        assert_eq!(reply.status, StatusCode::MISDIRECTED_REQUEST, "{host:?}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        "renkei-nishi.local".to_owned(),
        "renkei-nishi.local:443".to_owned(),
    ] {
        let reply = form.get("/", &[("host", &host)]).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "Host {host:?}: {}",
            reply.body
        );
    }
    // A post through a configured name, with that name as its origin, is saved.
    let token = form.token().await;
    let reply = form
        .post(
            "/report/shelter",
            &[
                ("host", "renkei-nishi.local"),
                ("origin", "http://renkei-nishi.local"),
            ],
            &format!("evacuees=4&csrf={token}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(form.saved_evacuees(), Some(4));
}

#[tokio::test]
async fn wrong_pins_lock_pin_entry_for_a_while() {
    let form = Form::start(Some(PIN), short_limits(), &[]).await;
    let origin = form.origin();
    let post = |evacuees: u32, pin: &'static str| {
        let form = &form;
        let origin = origin.clone();
        async move {
            let token = form.token().await;
            form.post(
                "/report/shelter",
                &[("origin", &origin)],
                &shelter_form(evacuees, pin, &token),
            )
            .await
        }
    };
    for attempt in 1..=4 {
        let reply = post(attempt, "999999").await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "attempt {attempt}");
        assert!(reply.body.contains("wrong PIN"), "{}", reply.body);
    }
    // The fifth wrong PIN locks PIN entry, and says so; then even the right PIN is refused,
    // with the reason in both languages.
    for (evacuees, pin) in [(5, "999999"), (6, PIN)] {
        let reply = post(evacuees, pin).await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.body
        );
        assert!(
            reply.body.contains("暗証番号の入力を一時停止")
                && reply.body.contains("too many wrong PINs")
                && reply.body.contains("NOT saved"),
            "{}",
            reply.body
        );
        assert!(reply.headers.contains_key(header::RETRY_AFTER));
        // What was typed comes back, so nothing is lost while waiting.
        assert!(
            reply.body.contains(&format!("value=\"{evacuees}\"")),
            "{}",
            reply.body
        );
    }
    assert_eq!(form.saved_evacuees(), None);
    // After the lockout (1.5 s here) the right PIN works again.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let reply = post(7, PIN).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(form.saved_evacuees(), Some(7));
}

// ---------------------------------------------------------------------------------------------
// Slow clients.

/// Open descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// How many of this process's descriptors are sockets whose local port is `port`: the
/// server's side of its connections (and its listener), not the test's clients.
fn server_sockets(port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Some(inode) = cols.get(9)
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| inodes.contains(target.to_string_lossy().as_ref()))
        .count()
}

/// Whether the server closes `stream` within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    closed_by(stream, Instant::now() + within).await
}

#[tokio::test]
async fn slow_clients_cannot_hold_the_form() {
    const SLOW: usize = 500;
    let limits = FormLimits {
        max_connections: 64,
        ..FormLimits::default()
    };
    let form = Form::start(None, limits, &[]).await;
    let port = form.addr.port();
    assert_eq!(server_sockets(port), 1, "the listener alone");
    let before = open_fds();
    // 500 slowloris connections from 100 addresses: half say nothing, half send a request
    // head a byte at a time, 100 ms apart.
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut opened = 0;
    for i in 0..SLOW {
        // From 100 addresses: Linux routes all of 127/8 to the loopback.
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 100) as u8);
        let Ok(mut stream) = connect_from(source.into(), form.addr).await else {
            continue;
        };
        opened += 1;
        let mut stop = stop.subscribe();
        tokio::spawn(async move {
            if i % 2 == 0 {
                let _ = stop.recv().await;
                return;
            }
            let head = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ");
            for b in head.bytes().chain(std::iter::repeat(b'a')) {
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if stream.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        });
    }
    assert_eq!(opened, SLOW, "the test could not open its connections");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A phone still gets the page, at once.
    let started = Instant::now();
    let page = form.get("/", &[]).await;
    let took = started.elapsed();
    assert_eq!(page.status, StatusCode::OK);
    assert!(took < Duration::from_secs(1), "the page took {took:?}");

    // The server holds at most its cap of connections (plus its listener), whatever the
    // clients hold: their 500 sockets are this process's too, so they are counted apart.
    let held = server_sockets(port);
    let during = open_fds();
    let _ = stop.send(());
    assert!(held <= 64 + 1 + 4, "the server holds {held} sockets");
    assert!(
        during <= before + SLOW + 64 + 8,
        "{before} descriptors before, {during} during"
    );
}

#[tokio::test]
async fn a_slow_request_head_or_body_is_cut_by_the_header_timeout() {
    let limits = FormLimits {
        header_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_secs(60),
        ..FormLimits::default()
    };
    let form = Form::start(None, limits, &[]).await;
    // Sends its request head a byte every 100 ms, never finishing: never quiet for long, but
    // cut once the head has taken 400 ms.
    let mut slow = TcpStream::connect(form.addr).await.unwrap();
    let started = Instant::now();
    let dribble = async {
        for b in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), dribble).await;
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(2)).contains(&took),
        "the slow head was cut after {took:?}"
    );
    // Says nothing at all: the same.
    let mut silent = TcpStream::connect(form.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_millis(1500)).await);
    // A POST whose body never comes: refused (408) once the header timeout has passed again.
    let mut stalled = TcpStream::connect(form.addr).await.unwrap();
    let head = format!(
        "POST /report/shelter HTTP/1.1\r\nHost: {}\r\nOrigin: http://{}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nevac",
        form.addr, form.addr
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), stalled.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the stalled body was not cut");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("NOT saved"), "{answer}");
    assert_eq!(form.saved_evacuees(), None);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let limits = FormLimits {
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_millis(300),
        ..FormLimits::default()
    };
    let form = Form::start(None, limits, &[]).await;
    // Says nothing: closed once idle for 300 ms, long before the header timeout.
    let mut silent = TcpStream::connect(form.addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_millis(1500)).await);
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Kept alive after its answer, then idle: closed too.
    let mut kept = TcpStream::connect(form.addr).await.unwrap();
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", form.addr).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_millis(1500), kept.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the kept-alive connection stayed open");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
}

// ---------------------------------------------------------------------------------------------
// The PIN's own strength, at start-up.

#[test]
fn run_refuses_a_short_pin_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let form_port = free_port();
    std::fs::write(
        &config,
        format!(
            "broker = \"mqtt://127.0.0.1:9\"\nward = 131041\nsite = \"s1\"\nname = \"n\"\n\
             state_dir = {:?}\nform_listen = \"127.0.0.1:{form_port}\"\nform_pin = \"2468\"\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    // The kit's agent sees no RENKEI_AGENT_FORM_PIN from the test's environment.
    let mut agent = AgentProcess::start(&["run", "--config", config.to_str().unwrap()]);
    let status = agent.wait_exit();
    let stderr = agent.log();
    assert!(!status.success());
    assert!(
        stderr.contains(&config.display().to_string())
            && stderr.contains("form_pin")
            && stderr.contains("6 to 64 digits"),
        "{stderr}"
    );
    assert!(!stderr.contains("2468"), "the PIN was printed: {stderr}");
}
