//! The command line: `--help`, `check-config`, the shipped default config.

use std::process::Command;

fn mqttd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(args)
        .output()
        .expect("run mqttd")
}

#[test]
fn help_lists_every_config_key_as_a_flag() {
    let out = mqttd(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--http-listen",
        "--allow-anonymous",
        "--max-connections",
        "--max-packet-size",
        "--max-inflight",
        "--max-queued-messages",
        "--max-topic-length",
        "--max-topic-levels",
        "--connect-timeout-secs",
        "--log-format",
        "--sys-interval-secs",
        "check-config",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn check_config_names_the_bad_key_and_line() {
    let dir = std::env::temp_dir().join(format!("mqttd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:1883\"\n# a comment\nmax_conections = 10\n",
    )
    .expect("write");
    let out = mqttd(&["check-config", bad.to_str().expect("utf-8 path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3: key `max_conections`"), "{err}");

    let bad_value = dir.join("bad_value.toml");
    std::fs::write(&bad_value, "max_packet_size = \"big\"\n").expect("write");
    let out = mqttd(&["check-config", bad_value.to_str().expect("utf-8 path")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad_value.toml:1: key `max_packet_size`")
    );

    let good = dir.join("good.toml");
    std::fs::write(&good, "listen = \"127.0.0.1:1999\"\nmax_connections = 10\n").expect("write");
    assert!(
        mqttd(&["check-config", good.to_str().expect("utf-8 path")])
            .status
            .success()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shipped_default_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/mqttd.toml");
    let out = mqttd(&["check-config", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_logs_and_anonymous_never() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-enabled",
            "false",
            "--quic-enabled",
            "false",
            "--log-format",
            "json",
        ])
        .args(["--log-level", "info", "--allow-anonymous", "never"])
        .args(["--storage", "memory"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mqttd");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("address line");
    let addr: std::net::SocketAddr = line
        .split("mqtt://")
        .nth(1)
        .and_then(|a| a.trim().parse().ok())
        .expect("address");
    // A 3.1.1 CONNECT: refused with return code 5 (not authorized), then closed.
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(&[
        0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x1E, 0x00, 0x01, b'x',
    ])
    .expect("write");
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read until close");
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x05]);
    let _ = child.kill();
    let _ = child.wait();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("logs");
    let first = logs.lines().next().unwrap_or("");
    assert!(
        first.starts_with('{') && first.contains("\"level\":\"INFO\""),
        "not JSON: {logs}"
    );
}

#[test]
fn busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = mqttd(&[
        "--listen",
        &addr,
        "--http-enabled",
        "false",
        "--quic-enabled",
        "false",
        "--storage",
        "memory",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for MQTT on {addr} (`listen`)")),
        "{err}"
    );
}

/// SIGTERM as soon as the first address line is out — while the QUIC listener is still being
/// set up (its certificate generated) — shuts down gracefully (exit status 0), rather than the
/// default action killing the process. The signal handlers are installed before anything
/// listens; with them installed last, a client that connected and sent SIGTERM right away
/// (tests/e2e/mosq.rs `graceful_shutdown_sends_0x8b` on a loaded machine) saw no DISCONNECT.
#[test]
fn sigterm_right_after_the_first_listener_is_up_shuts_down_gracefully() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let dir = std::env::temp_dir().join(format!("mqttd-e2e-early-term-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(["--listen", "127.0.0.1:0", "--http-enabled", "false"])
        .args(["--quic-listen", "127.0.0.1:0", "--storage", "memory"])
        .args(["--log-level", "warn", "--data-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start mqttd");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("address line");
    assert!(line.contains("mqtt://"), "{line}");
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    // Drain stdout (the QUIC line may still come) so the broker never blocks on the pipe.
    let drain = std::thread::spawn(move || stdout.lines().count());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("mqttd did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = drain.join();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.signal(), None, "killed by the signal: {status:?}");
    assert!(status.success(), "{status:?}");
}
