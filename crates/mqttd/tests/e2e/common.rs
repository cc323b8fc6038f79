//! Shared helpers: start the real `mqttd` binary on free loopback ports, a raw MQTT client on
//! the codec, and the mosquitto command-line clients.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_codec::{ConnAck, Connect, MqttString, Packet, ProtocolVersion, decode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running `mqttd` process, killed on drop.
pub struct Mqttd {
    pub child: Child,
    pub mqtt: SocketAddr,
    pub http: Option<SocketAddr>,
    /// The MQTT-over-TLS address, when started with `--tls-listen`.
    pub tls: Option<SocketAddr>,
}

impl Mqttd {
    /// Starts the binary with `--listen 127.0.0.1:0` (the OS picks a free port) plus `args`, and
    /// reads the addresses it prints.
    pub fn start(args: &[&str]) -> Mqttd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--log-level",
                "warn",
                // Tests run in parallel: the QUIC listener's fixed default port would clash
                // (tests/quic/ runs it on free ports).
                "--quic-enabled",
                "false",
            ])
            // Durable storage is the default; these tests run in memory unless they ask.
            .args(if args.contains(&"--storage") {
                &[][..]
            } else {
                &["--storage", "memory"][..]
            })
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mqttd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Keep draining so the broker never blocks on a full pipe.
                    continue;
                }
            }
        });
        let mut mqtt = None;
        let mut http = None;
        let mut tls = None;
        let deadline = std::time::Instant::now() + WAIT;
        while mqtt.is_none()
            || (http.is_none() && !args.contains(&"--http-enabled"))
            || (tls.is_none() && args.contains(&"--tls-listen"))
        {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("mqttd printed its addresses in time");
            if let Some(rest) = line.split("mqtt://").nth(1) {
                mqtt = rest.trim().parse().ok();
            }
            if let Some(rest) = line.split("mqtts://").nth(1) {
                tls = rest.split(' ').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("http://").nth(1) {
                http = rest.split('/').next().and_then(|a| a.parse().ok());
            }
        }
        Mqttd {
            child,
            mqtt: mqtt.expect("mqtt address"),
            http,
            tls,
        }
    }

    pub fn port(&self) -> u16 {
        self.mqtt.port()
    }

    /// Resident memory of the broker process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The value of a Prometheus series from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let http = self.http.expect("the HTTP endpoint is enabled");
        let mut s = std::net::TcpStream::connect(http).expect("connect http");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {name} in {body}"))
    }

    /// Waits until a metric satisfies `ok` (e.g. a CLI subscriber has subscribed).
    pub fn wait_metric(&self, name: &str, ok: impl Fn(u64) -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let v = self.metric(name);
            if ok(v) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{name} stuck at {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mqttd did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mqttd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of a mosquitto command-line client; fails the test if it is missing.
pub fn mosquitto(tool: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(tool);
    assert!(
        path.exists(),
        "{tool} is required by this test but {} does not exist: install Debian's `mosquitto-clients` \
         (`apt-get install mosquitto-clients`; `.ci/run` does it)",
        path.display()
    );
    path
}

pub fn mstr(s: &str) -> MqttString {
    MqttString::from_bytes(Bytes::copy_from_slice(s.as_bytes())).expect("valid string")
}

/// A raw MQTT client on the codec: full control over every byte and property.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    pub version: ProtocolVersion,
}

impl Raw {
    pub async fn tcp(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        Raw {
            stream,
            buf: BytesMut::new(),
            version: ProtocolVersion::V5,
        }
    }

    /// Connects and completes the CONNECT/CONNACK exchange.
    pub async fn connect(port: u16, connect: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw::tcp(port).await;
        raw.version = connect.protocol_version;
        raw.send(Packet::Connect(Box::new(connect))).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => (raw, *a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.encode(self.version, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next packet, `None` on EOF or reset. Panics after [`WAIT`].
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, self.recv_inner())
            .await
            .expect("a packet or a close in time")
    }

    /// The next packet within `limit`, `Err` on timeout.
    pub async fn recv_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Packet>, tokio::time::error::Elapsed> {
        tokio::time::timeout(limit, self.recv_inner()).await
    }

    async fn recv_inner(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) =
                decode(&mut self.buf, self.version, 1 << 24).expect("broker sent a valid packet")
            {
                return Some(p);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the broker closes the connection; returns every packet seen before.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let deadline = std::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
            assert!(
                std::time::Instant::now() < deadline,
                "still open after {WAIT:?}: {seen:?}"
            );
        }
        seen
    }
}

/// Runs the broker with `args` (on free ports, in memory, without QUIC or HTTP), expects it to
/// refuse to start within [`WAIT`], and returns what it printed on stderr.
pub fn fails_to_start(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["--listen", "127.0.0.1:0", "--http-enabled", "false"])
        .args(["--quic-enabled", "false", "--storage", "memory"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mqttd");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("mqttd {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "mqttd {args:?} exited successfully");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a mosquitto command-line client to completion, bounded by its own `-W`/`-C` and by
/// 20 s of ours (it is killed and the test fails after that).
pub fn run_tool(tool: &str, args: &[String]) -> std::process::Output {
    let mut child = Command::new(mosquitto(tool))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto client");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{tool} {args:?} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A new, empty directory for one test (`mqttd-e2e-<name>-<pid>` in the system's temp dir).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqttd-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    dir
}

/// Adds `user` with `password` to the password file `file` (which must exist) with
/// `mqttd passwd -b`.
pub fn mqttd_passwd(file: &std::path::Path, user: &str, password: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["passwd", "-b"])
        .arg(file)
        .args([user, password])
        .output()
        .expect("mqttd passwd");
    assert!(out.status.success(), "mqttd passwd: {out:?}");
}
