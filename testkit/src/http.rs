//! Plain HTTP/1.1 for tests: one request per connection (`Connection: close`), the response
//! read to the end. Renkei's servers answer with a Content-Length, so the body is everything
//! after the head; a chunked answer fails the test.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::wait::PATIENCE;

/// `GET path` from the server at `addr`.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_get_as(addr, path, None).await
}

/// [`http_get`] with HTTP Basic credentials, if any.
pub async fn http_get_as(
    addr: SocketAddr,
    path: &str,
    login: Option<(&str, &str)>,
) -> HttpResponse {
    let mut request = HttpRequest::get(path);
    if let Some((user, password)) = login {
        request = request.basic_auth(user, password);
    }
    request.send(addr).await
}

/// The `/metrics` page of the broker whose HTTP server is at `addr`, read as `login`.
pub async fn scrape(addr: SocketAddr, login: Option<(&str, &str)>) -> String {
    http_get_as(addr, "/metrics", login).await.text()
}

/// The value of one sample line of a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One request.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    pub fn get(path: &str) -> HttpRequest {
        HttpRequest {
            method: "GET",
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A POST of an url-encoded form, as a browser submits one.
    pub fn post_form(path: &str, form: &str) -> HttpRequest {
        HttpRequest {
            method: "POST",
            path: path.to_owned(),
            headers: Vec::new(),
            body: form.as_bytes().to_vec(),
        }
        .header("Content-Type", "application/x-www-form-urlencoded")
    }

    /// Adds a header (after `Host`, which is always the server's address).
    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds HTTP Basic credentials.
    pub fn basic_auth(self, user: &str, password: &str) -> HttpRequest {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.header("Authorization", &format!("Basic {token}"))
    }

    /// Sends the request to `addr`; panics if no whole response comes within [`PATIENCE`].
    pub async fn send(&self, addr: SocketAddr) -> HttpResponse {
        self.try_send(addr, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{} {} at {addr}: {e}", self.method, self.path))
    }

    /// Sends the request to `addr`: the response, or why there was none within `within`.
    pub async fn try_send(
        &self,
        addr: SocketAddr,
        within: Duration,
    ) -> std::io::Result<HttpResponse> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\n", self.method, self.path);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.method != "GET" || !self.body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut raw = Vec::new();
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&self.body).await?;
            stream.read_to_end(&mut raw).await
        };
        tokio::time::timeout(within, exchange).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no response in time")
        })??;
        HttpResponse::parse(raw)
    }
}

/// A response: its status, its head as sent, its body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    fn parse(raw: Vec<u8>) -> std::io::Result<HttpResponse> {
        let invalid =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| invalid("no end of the HTTP head"))?;
        let head = String::from_utf8(raw[..split].to_vec())
            .map_err(|_| invalid("a head that is not UTF-8"))?;
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Err(invalid("a chunked body, which this client does not read"));
        }
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid("no status code"))?;
        Ok(HttpResponse {
            status,
            head,
            body: raw[split + 4..].to_vec(),
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}
