//! The HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /health`.
//!
//! A deliberately tiny HTTP/1.1 responder on tokio rather than `hyper`: two fixed GET routes,
//! one request per connection (`Connection: close`), a 8 KiB request cap and a 5 s deadline.
//! That is all a Prometheus scraper or a load-balancer health check needs, and it keeps a large
//! dependency tree (and its compile time on 2 cores) out of the broker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const DEADLINE: Duration = Duration::from_secs(5);

/// Serves `/metrics` and `/health` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        if tokio::time::timeout(DEADLINE, respond(stream, &metrics)).await.is_err() {
                            tracing::debug!(%peer, "http request timed out");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// The response to a request line, as `(status, content type, body)`.
pub fn route(request_line: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render_prometheus(),
        ),
        ("GET", "/health") | ("GET", "/healthz") => (
            "200 OK",
            "application/json",
            format!(
                "{{\"status\":\"ok\",\"uptime_seconds\":{}}}\n",
                metrics.uptime_secs()
            ),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    }
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read until the end of the headers; the body (if any) is ignored.
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST {
            let _ = stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").await;
            return;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("");
    let (status, content_type, body) = route(line, metrics);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if !line.starts_with("HEAD ") {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

/// Binds the HTTP listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::new();
        let (s, ct, body) = route("GET /metrics HTTP/1.1", &m);
        assert_eq!(s, "200 OK");
        assert!(ct.starts_with("text/plain"));
        assert!(body.contains("mqttd_clients_connected"));
        assert_eq!(route("GET /health HTTP/1.1", &m).0, "200 OK");
        assert_eq!(route("GET /nope HTTP/1.1", &m).0, "404 Not Found");
        assert_eq!(
            route("POST /metrics HTTP/1.1", &m).0,
            "405 Method Not Allowed"
        );
        assert_eq!(route("", &m).0, "405 Method Not Allowed");
    }
}
