//! MQTT over TLS (`--tls-listen`) with independent TLS stacks: mosquitto's clients (libmosquitto
//! on the system's OpenSSL) and rumqttc on rustls; sessions shared with plain TCP.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clients::{v4, v4_tls};
use crate::common::{Mqttd, WAIT, fresh_dir, mosquitto, run_tool as run};

/// A fresh data directory for one test (the broker writes its generated certificate there).
fn data_dir(name: &str) -> PathBuf {
    fresh_dir(&format!("tls-{name}"))
}

/// Starts the broker with a TLS listener on a free port; returns it and the generated
/// certificate the clients trust.
fn start(dir: &Path, extra: &[&str]) -> (Mqttd, PathBuf) {
    let d = dir.to_str().expect("utf-8 path");
    let mut args = vec!["--tls-listen", "127.0.0.1:0", "--data-dir", d];
    args.extend_from_slice(extra);
    let broker = Mqttd::start(&args);
    let ca = dir.join("quic-cert.pem");
    assert!(
        ca.exists(),
        "the generated certificate is in the data directory"
    );
    (broker, ca)
}

fn tls_port(broker: &Mqttd) -> u16 {
    broker
        .tls
        .expect("the broker printed its mqtts:// address")
        .port()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn tls_args(port: u16, ca: &Path, rest: &[&str]) -> Vec<String> {
    let mut v = strings(&["-h", "127.0.0.1", "-p"]);
    v.push(port.to_string());
    v.push("--cafile".into());
    v.push(ca.display().to_string());
    v.extend(strings(rest));
    v
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// A rustls client configuration trusting the CA certificates in `ca` and offering exactly
/// `versions` (so a test knows which TLS version it speaks).
fn rustls(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rumqttc::TlsConfiguration {
    let pem = std::fs::read(ca).expect("ca");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.expect("PEM certificate")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    rumqttc::TlsConfiguration::Rustls(Arc::new(config))
}

fn any_version(ca: &Path) -> rumqttc::TlsConfiguration {
    rustls(ca, rustls::ALL_VERSIONS)
}

/// Connects over TLS offering only `version`; the outcome of the handshake and CONNACK
/// (rumqttc's error when it fails).
async fn tls_connack(
    port: u16,
    ca: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<(), String> {
    let mut opts = rumqttc::MqttOptions::new("version-probe", "127.0.0.1", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(rustls(ca, &[version])));
    let (_client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let first = tokio::time::timeout(WAIT, el.poll())
        .await
        .expect("the handshake ends either way");
    match first {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_clients_meet_a_tcp_subscriber() {
    let dir = data_dir("mosq");
    let (broker, ca) = start(&dir, &[]);
    let port = tls_port(&broker);
    // A plain TCP subscriber (rumqttc) gets what TLS publishers send.
    let mut sub = v4(broker.port(), "tcp-sub", true, None).await;
    sub.client
        .subscribe("tls/in", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    sub.suback().await;
    // rustls offering exactly TLS 1.2, then exactly TLS 1.3.
    for (name, version) in [
        ("1.2", &rustls::version::TLS12),
        ("1.3", &rustls::version::TLS13),
    ] {
        let publisher = v4_tls(port, &format!("tls-{name}"), true, rustls(&ca, &[version])).await;
        publisher
            .client
            .publish("tls/in", rumqttc::QoS::AtLeastOnce, false, name)
            .await
            .expect("publish");
        let p = sub.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("tls/in", name.as_bytes())
        );
    }
    // mosquitto_pub (libmosquitto on the system's OpenSSL), MQTT 5.0.
    let out = tokio::task::block_in_place(|| {
        run(
            "mosquitto_pub",
            &tls_args(
                port,
                &ca,
                &["-V", "mqttv5", "-q", "1", "-t", "tls/in", "-m", "mosquitto"],
            ),
        )
    });
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
    let p = sub.next_publish().await;
    assert_eq!(&p.payload[..], b"mosquitto");
    sub.client.disconnect().await.expect("disconnect");
    broker.wait_metric("mqttd_subscriptions", |n| n == 0);
    // And the other way: a TLS subscriber gets what a TCP publisher sends, QoS 2.
    let sub = Command::new(mosquitto("mosquitto_sub"))
        .args(tls_args(
            port,
            &ca,
            &["-q", "2", "-t", "tls/out", "-C", "1", "-W", "15", "-v"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_sub");
    broker.wait_metric("mqttd_subscriptions", |n| n == 1);
    let publisher = v4(broker.port(), "tcp-pub", true, None).await;
    publisher
        .client
        .publish("tls/out", rumqttc::QoS::ExactlyOnce, false, "over tls")
        .await
        .expect("publish");
    let out = tokio::task::block_in_place(|| sub.wait_with_output()).expect("mosquitto_sub");
    assert!(out.status.success(), "mosquitto_sub: {out:?}");
    assert_eq!(stdout(&out), "tls/out over tls");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_moves_between_tls_and_tcp_with_its_queue() {
    let dir = data_dir("resume");
    let (broker, ca) = start(&dir, &[]);
    let id = "roamer";
    // Subscribe over TLS (rustls) with a persistent session, then go away.
    let mut c = v4_tls(tls_port(&broker), id, false, any_version(&ca)).await;
    c.client
        .subscribe("roam/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    c.suback().await;
    c.client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(WAIT, c.task).await;
    let publisher = v4(broker.port(), "roam-pub", true, None).await;
    publisher
        .client
        .publish(
            "roam/1",
            rumqttc::QoS::AtLeastOnce,
            false,
            "queued while away",
        )
        .await
        .expect("publish");
    // Resume over plain TCP: the queued message arrives.
    let mut c = v4(broker.port(), id, false, None).await;
    let p = c.next_publish().await;
    assert_eq!(&p.payload[..], b"queued while away");
    c.client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(WAIT, c.task).await;
    publisher
        .client
        .publish("roam/2", rumqttc::QoS::AtLeastOnce, false, "and back")
        .await
        .expect("publish");
    // And back over TLS.
    let mut c = v4_tls(tls_port(&broker), id, false, any_version(&ca)).await;
    let p = c.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("roam/2", &b"and back"[..])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_on_the_tls_port_are_closed_and_tls_clients_carry_on() {
    let dir = data_dir("bad");
    let (broker, ca) = start(&dir, &[]);
    let port = tls_port(&broker);
    let mut good = v4_tls(port, "good", true, any_version(&ca)).await;
    good.client
        .subscribe("still/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    good.suback().await;
    // A plain MQTT CONNECT (3.1.1, client id "x") on the TLS port, then garbage.
    let connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01x";
    for bytes in [
        &connect[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3][..],
        &[0u8; 512][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(bytes).await.expect("write");
        let mut buf = [0u8; 256];
        // The broker closes it (possibly after a TLS alert); it never answers with a CONNACK.
        let closed = tokio::time::timeout(WAIT, async {
            let mut got = Vec::new();
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("the broker closes a connection that does not speak TLS");
        assert!(
            closed.first() != Some(&0x20),
            "no MQTT CONNACK in the clear: {closed:?}"
        );
    }
    // The TLS client was not disturbed.
    let publisher = v4_tls(port, "pub", true, any_version(&ca)).await;
    publisher
        .client
        .publish("still/here", rumqttc::QoS::AtLeastOnce, false, "yes")
        .await
        .expect("publish");
    let p = good.next_publish().await;
    assert_eq!(&p.payload[..], b"yes");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA and a client certificate it signed, written as PEM files into `dir`.
fn client_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mqttd test client CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device-1");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("client cert");
    let paths = (
        dir.join("client-ca.pem"),
        dir.join("client.pem"),
        dir.join("client-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

#[test]
fn client_certificates_are_required_when_configured() {
    let dir = data_dir("mtls");
    let (client_ca, client_cert, client_key) = client_pki(&dir);
    let (broker, ca) = start(
        &dir,
        &[
            "--tls-cafile",
            client_ca.to_str().expect("utf-8"),
            "--tls-require-certificate",
            "true",
        ],
    );
    let port = tls_port(&broker);
    let publish = |extra: &[&str]| {
        let mut rest = strings(&["-q", "1", "-t", "mtls/x", "-m", "hi"]);
        rest.extend(strings(extra));
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        run("mosquitto_pub", &tls_args(port, &ca, &rest))
    };
    let with = publish(&[
        "--cert",
        client_cert.to_str().expect("utf-8"),
        "--key",
        client_key.to_str().expect("utf-8"),
    ]);
    assert!(with.status.success(), "with a client certificate: {with:?}");
    let without = publish(&[]);
    assert!(
        !without.status.success(),
        "without a client certificate the handshake is refused: {without:?}"
    );
    // A certificate from another CA (the broker's own self-signed one) is refused too.
    let key = dir.join("quic-key.pem");
    let wrong = publish(&[
        "--cert",
        ca.to_str().expect("utf-8"),
        "--key",
        key.to_str().expect("utf-8"),
    ]);
    assert!(
        !wrong.status.success(),
        "a certificate of another CA: {wrong:?}"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_3_only_refuses_tls_1_2_clients() {
    let dir = data_dir("v13");
    let (broker, ca) = start(&dir, &["--tls-min-version", "1.3"]);
    let port = tls_port(&broker);
    let old = tls_connack(port, &ca, &rustls::version::TLS12).await;
    assert!(old.is_err(), "TLS 1.2 refused: {old:?}");
    let new = tls_connack(port, &ca, &rustls::version::TLS13).await;
    assert_eq!(new, Ok(()), "TLS 1.3 accepted");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mqttd pub`/`mqttd sub` over TLS: verified against the generated certificate, `--insecure`
/// without it, and refused against a CA that did not sign the broker's certificate.
#[test]
fn mqttd_pub_and_sub_speak_tls() {
    let dir = data_dir("cli");
    let (broker, ca) = start(&dir, &[]);
    let port = tls_port(&broker).to_string();
    let ca = ca.to_str().expect("utf-8 path").to_owned();
    // `mqttd <subcommand> -H 127.0.0.1 -p PORT --tls <rest>`.
    let mqttd = |subcommand: &str, rest: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqttd"));
        cmd.args([subcommand, "-H", "127.0.0.1", "-p", &port, "--tls"])
            .args(rest)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let sub = mqttd(
        "sub",
        &["--cafile", &ca, "-t", "cli/#", "-C", "1", "-W", "15", "-v"],
    )
    .spawn()
    .expect("mqttd sub");
    broker.wait_metric("mqttd_subscriptions", |n| n == 1);
    let out = mqttd(
        "pub",
        &["--cafile", &ca, "-t", "cli/x", "-m", "over tls", "-q", "1"],
    )
    .output()
    .expect("mqttd pub");
    assert!(out.status.success(), "mqttd pub --tls: {out:?}");
    let out = sub.wait_with_output().expect("mqttd sub");
    assert!(out.status.success(), "mqttd sub --tls: {out:?}");
    assert_eq!(stdout(&out), "cli/x over tls");
    let out = mqttd("pub", &["--insecure", "-t", "cli/y", "-m", "unverified"])
        .output()
        .expect("mqttd pub");
    assert!(out.status.success(), "mqttd pub --tls --insecure: {out:?}");
    let (other_ca, _, _) = client_pki(&dir);
    let other_ca = other_ca.to_str().expect("utf-8 path");
    let out = mqttd(
        "pub",
        &["--cafile", other_ca, "-t", "cli/z", "-m", "refused"],
    )
    .output()
    .expect("mqttd pub");
    assert!(
        !out.status.success(),
        "a certificate of another CA: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{out:?}"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
