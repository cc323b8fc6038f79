//! Username/password authentication (`password_file`): files written by mosquitto_passwd and by
//! `mqttd passwd`, checked with rumqttc (3.1.1 and 5.0) and mosquitto_pub.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rumqttc::v5 as r5;

use crate::common::{Mqttd, WAIT, fails_to_start, fresh_dir, mosquitto, mqttd_passwd};

fn data_dir(name: &str) -> PathBuf {
    fresh_dir(&format!("auth-{name}"))
}

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what}: {out:?}");
    out
}

/// alice by mosquitto_passwd (PBKDF2-SHA512, mosquitto 2's default), carol by `mqttd passwd`
/// (Argon2id), in one file.
fn password_file(dir: &Path) -> PathBuf {
    let file = dir.join("passwd");
    let f = file.to_str().expect("utf-8 path");
    ok(
        Command::new(mosquitto("mosquitto_passwd"))
            .args(["-c", "-b", f, "alice", "secret pass"])
            .output()
            .expect("mosquitto_passwd"),
        "mosquitto_passwd",
    );
    mqttd_passwd(&file, "carol", "carol's pw");
    file
}

/// The outcome of a 3.1.1 CONNECT with these credentials.
async fn v4_connect(port: u16, credentials: Option<(&str, &str)>) -> Result<(), String> {
    let mut opts = rumqttc::MqttOptions::new("auth-v4", "127.0.0.1", port);
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (_client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    match tokio::time::timeout(WAIT, el.poll()).await {
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => Ok(()),
        Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => Err(format!("{code:?}")),
        other => panic!("3.1.1 CONNECT: unexpected {other:?}"),
    }
}

/// The outcome of a 5.0 CONNECT with these credentials.
async fn v5_connect(port: u16, credentials: Option<(&str, &str)>) -> Result<(), String> {
    let mut opts = r5::MqttOptions::new("auth-v5", "127.0.0.1", port);
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (_client, mut el) = r5::AsyncClient::new(opts, 10);
    match tokio::time::timeout(WAIT, el.poll()).await {
        Ok(Ok(r5::Event::Incoming(r5::mqttbytes::v5::Packet::ConnAck(_)))) => Ok(()),
        Ok(Err(r5::ConnectionError::ConnectionRefused(code))) => Err(format!("{code:?}")),
        other => panic!("5.0 CONNECT: unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_mosquitto_passwd_and_mqttd_passwd_are_checked() {
    let dir = data_dir("check");
    let file = password_file(&dir);
    let broker = Mqttd::start(&[
        "--password-file",
        file.to_str().expect("utf-8 path"),
        "--allow-anonymous",
        "never",
        "--tls-listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
    ]);
    let port = broker.port();
    for (user, pass) in [("alice", "secret pass"), ("carol", "carol's pw")] {
        assert_eq!(v4_connect(port, Some((user, pass))).await, Ok(()), "{user}");
        assert_eq!(v5_connect(port, Some((user, pass))).await, Ok(()), "{user}");
        let wrong = Some((user, "wrong"));
        assert_eq!(
            v4_connect(port, wrong).await,
            Err("BadUserNamePassword".into())
        );
        assert_eq!(
            v5_connect(port, wrong).await,
            Err("BadUserNamePassword".into())
        );
        // The right password still works after a wrong one.
        assert_eq!(v4_connect(port, Some((user, pass))).await, Ok(()), "{user}");
    }
    assert_eq!(
        v5_connect(port, Some(("mallory", "secret pass"))).await,
        Err("BadUserNamePassword".into()),
        "an unknown user"
    );
    // Without a username the anonymous policy decides: never.
    assert_eq!(v4_connect(port, None).await, Err("NotAuthorized".into()));
    assert_eq!(v5_connect(port, None).await, Err("NotAuthorized".into()));
    // mosquitto_pub with and without the right password.
    let publish = |pass: &str| {
        Command::new(mosquitto("mosquitto_pub"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-u",
                "alice",
                "-P",
                pass,
            ])
            .args(["-t", "auth/x", "-m", "hi", "-q", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("mosquitto_pub")
    };
    let out = tokio::task::block_in_place(|| publish("secret pass"));
    ok(out, "mosquitto_pub with alice's password");
    let out = tokio::task::block_in_place(|| publish("nope"));
    assert!(
        !out.status.success(),
        "a wrong password is refused: {out:?}"
    );
    // Over TLS (the connection task's handshake path) with `mqttd pub -u -P`.
    let tls_port = broker.tls.expect("TLS listener").port().to_string();
    let mqttd_pub = |pass: &str| {
        Command::new(env!("CARGO_BIN_EXE_mqttd"))
            .args([
                "pub",
                "--tls",
                "--insecure",
                "-H",
                "127.0.0.1",
                "-p",
                &tls_port,
            ])
            .args(["-u", "carol", "-P", pass, "-t", "auth/tls", "-m", "hi"])
            .output()
            .expect("mqttd pub")
    };
    let out = tokio::task::block_in_place(|| mqttd_pub("carol's pw"));
    ok(out, "mqttd pub over TLS with carol's password");
    let out = tokio::task::block_in_place(|| mqttd_pub("wrong"));
    assert!(!out.status.success(), "a wrong password over TLS: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("BadUserNameOrPassword"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unusable_password_file_stops_the_broker_naming_the_line() {
    let dir = data_dir("bad");
    let file = dir.join("passwd");
    std::fs::write(&file, "# devices\nalice:plain text password\n").expect("write");
    let stderr = fails_to_start(&["--password-file", file.to_str().expect("utf-8 path")]);
    assert!(
        stderr.contains(&format!("{}:2: user `alice`", file.display())),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
