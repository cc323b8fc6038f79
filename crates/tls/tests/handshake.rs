//! Two ngtcp2 connections, both on mqttd-tls, handshake in memory: every cipher suite, key update,
//! resumption with 0-RTT, the failures a user meets, and a panic caught at the FFI boundary.

mod support;

use mqttd_ngtcp2_sys::*;
use mqttd_tls::{CipherSuite, ClientConfig, ServerConfig, TlsError};
use support::{Side, TestPki, drive, pair, pair_with};

const MQTT: &[&[u8]] = &[b"mqtt"];

#[test]
fn handshake_and_stream_data_for_every_cipher_suite() {
    let pki = TestPki::new();
    let server_cfg = pki.server_config(MQTT);
    for suite in CipherSuite::ALL {
        let client_cfg = ClientConfig::builder()
            .ca_pem(pki.ca_pem.as_bytes())
            .alpn(MQTT)
            .cipher_suites(&[suite])
            .build()
            .unwrap();
        let (mut client, mut server, result) = pair(&client_cfg, &server_cfg);
        let mut tick = result.unwrap_or_else(|e| panic!("{suite:?}: {e}"));
        assert!(client.handshake_completed && server.handshake_completed);
        assert_eq!(client.tls.cipher_suite(), Some(suite));
        assert_eq!(server.tls.cipher_suite(), Some(suite));
        assert_eq!(client.tls.alpn().as_deref(), Some(&b"mqtt"[..]));
        assert_eq!(server.tls.alpn().as_deref(), Some(&b"mqtt"[..]));
        assert_eq!(server.tls.server_name().as_deref(), Some("localhost"));

        let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let id = client.open_bidi();
        client.outgoing.push((id, payload.clone(), 0));
        server.outgoing.push((id, b"pong".to_vec(), 0));
        let mut to_server = client.send(tick).unwrap();
        drive(&mut client, &mut server, &mut to_server, &mut tick).unwrap();
        assert_eq!(server.received_on(id), &payload[..], "{suite:?}");
        assert_eq!(client.received_on(id), b"pong", "{suite:?}");
    }
}

#[test]
fn a_server_frees_its_tls_state_after_the_handshake_and_refuses_later_tls_messages() {
    let pki = TestPki::new();
    let (mut client, mut server, result) = pair(&pki.client_config(MQTT), &pki.server_config(MQTT));
    let mut tick = result.unwrap();
    assert!(
        server.tls.is_released(),
        "an idle server connection keeps no OpenSSL state"
    );
    assert!(
        !client.tls.is_released(),
        "a client keeps its SSL: session tickets arrive after the handshake"
    );
    // What the application asks after the handshake is still answered.
    assert_eq!(server.tls.alpn().as_deref(), Some(&b"mqtt"[..]));
    assert_eq!(server.tls.server_name().as_deref(), Some("localhost"));
    assert_eq!(server.tls.cipher_suite(), client.tls.cipher_suite());
    assert!(server.tls.cipher_suite().is_some());
    assert_eq!(
        server.tls.key_exchange_group(),
        client.tls.key_exchange_group()
    );
    assert!(!server.tls.session_reused() && !server.tls.early_data_accepted());

    // The connection still carries data both ways (the 1-RTT keys live in ngtcp2).
    let id = client.open_bidi();
    client.outgoing.push((id, b"after the release".to_vec(), 0));
    server.outgoing.push((id, b"still here".to_vec(), 0));
    let mut to_server = client.send(tick).unwrap();
    drive(&mut client, &mut server, &mut to_server, &mut tick).unwrap();
    assert_eq!(server.received_on(id), b"after the release");
    assert_eq!(client.received_on(id), b"still here");

    // A TLS KeyUpdate in a 1-RTT CRYPTO frame is forbidden in QUIC (RFC 9001, 6): the server
    // answers with alert 10 (unexpected_message) instead of handing it to a freed SSL.
    let key_update = [24u8, 0, 0, 1, 0];
    // SAFETY: live connection; ngtcp2 copies the data.
    let rv = unsafe {
        ngtcp2_conn_submit_crypto_data(
            client.conn,
            ngtcp2_encryption_level_NGTCP2_ENCRYPTION_LEVEL_1RTT,
            key_update.as_ptr(),
            key_update.len(),
        )
    };
    assert_eq!(rv, 0, "submit_crypto_data");
    tick += 1;
    let datagrams = client.send(tick).unwrap();
    assert!(!datagrams.is_empty());
    let rvs: Vec<i32> = datagrams.iter().map(|d| server.recv(d, tick)).collect();
    assert!(rvs.iter().any(|&rv| rv != 0), "server read_pkt: {rvs:?}");
    assert_eq!(server.tls.alert_sent(), Some(10));
    let text = server.tls.take_error().expect("recorded").to_string();
    assert!(
        text.contains("unexpected_message") && text.contains("after the handshake"),
        "{text}"
    );
}

#[test]
fn key_update_keeps_the_connection_working() {
    let pki = TestPki::new();
    let (mut client, mut server, result) = pair(&pki.client_config(MQTT), &pki.server_config(MQTT));
    let mut tick = result.unwrap();
    // SAFETY: live connection.
    let rv = unsafe { ngtcp2_conn_initiate_key_update(client.conn, support::now_ns(tick)) };
    assert_eq!(rv, 0, "initiate_key_update");
    let id = client.open_bidi();
    client
        .outgoing
        .push((id, b"after the key update".to_vec(), 0));
    let mut to_server = client.send(tick).unwrap();
    drive(&mut client, &mut server, &mut to_server, &mut tick).unwrap();
    assert_eq!(server.received_on(id), b"after the key update");
    assert!(client.key_updates >= 1, "client derived new keys");
    assert!(server.key_updates >= 1, "server followed the key update");
}

#[test]
fn resumption_with_0rtt_stream_data_accepted() {
    let pki = TestPki::new();
    let server_cfg = pki.server_config(MQTT);
    let client_cfg = pki.client_config(MQTT);
    let (mut first, _server1, result) = pair(&client_cfg, &server_cfg);
    result.unwrap();
    assert!(!first.tls.session_reused());
    assert!(
        client_cfg.has_ticket("localhost"),
        "the server sent a session ticket"
    );
    first.remember_0rtt_params();

    let mut stream = -1;
    let (client, server, result) = pair_with(&client_cfg, &server_cfg, NGTCP2_PROTO_VER_V1, |c| {
        stream = c.open_bidi();
        c.outgoing.push((stream, b"CONNECT in 0-RTT".to_vec(), 0));
    });
    result.unwrap();
    assert!(client.tls.session_reused() && server.tls.session_reused());
    assert!(server.tls.early_data_accepted(), "server accepted 0-RTT");
    assert!(
        client.tls.early_data_accepted(),
        "client saw 0-RTT accepted"
    );
    assert_eq!(server.received_on(stream), b"CONNECT in 0-RTT");
}

#[test]
fn quic_v2_handshake() {
    let pki = TestPki::new();
    let (client, server, result) = pair_with(
        &pki.client_config(MQTT),
        &pki.server_config(MQTT),
        NGTCP2_PROTO_VER_V2,
        |_| {},
    );
    result.unwrap();
    // SAFETY: live connections.
    unsafe {
        assert_eq!(
            ngtcp2_conn_get_negotiated_version(client.conn),
            NGTCP2_PROTO_VER_V2
        );
        assert_eq!(
            ngtcp2_conn_get_negotiated_version(server.conn),
            NGTCP2_PROTO_VER_V2
        );
    }
}

fn failure(
    client_cfg: &ClientConfig,
    server_cfg: &ServerConfig,
    server_name: &str,
) -> (Box<Side>, Box<Side>) {
    let mut tick = 0;
    let mut client = Side::client_to(client_cfg, server_name, NGTCP2_PROTO_VER_V1, tick);
    let mut to_server = client.send(tick).unwrap();
    let mut server = Side::server(server_cfg, &to_server[0], tick);
    let result = drive(&mut client, &mut server, &mut to_server, &mut tick);
    assert!(result.is_err(), "the handshake must fail");
    (client, server)
}

#[test]
fn alpn_mismatch_is_alert_120_naming_the_offer() {
    let pki = TestPki::new();
    let (_client, mut server) = failure(
        &pki.client_config(&[b"h3"]),
        &pki.server_config(MQTT),
        "localhost",
    );
    assert_eq!(server.tls.alert_sent(), Some(120));
    let err = server
        .tls
        .take_error()
        .expect("server recorded the failure")
        .to_string();
    assert!(
        err.contains("alert 120 (no_application_protocol)") && err.contains("[h3]"),
        "{err}"
    );
}

#[test]
fn untrusted_certificate_is_refused_by_the_client() {
    let pki = TestPki::new();
    let other = TestPki::named("some other CA");
    let (mut client, _server) = failure(
        &other.client_config(MQTT),
        &pki.server_config(MQTT),
        "localhost",
    );
    let err = client
        .tls
        .take_error()
        .expect("client recorded the failure");
    let text = err.to_string();
    assert!(
        matches!(err, TlsError::AlertSent { alert: 48, .. }),
        "{text}"
    );
    assert!(
        text.contains("server localhost")
            && text.contains("unable to get local issuer certificate"),
        "{text}"
    );
}

#[test]
fn wrong_server_name_is_refused() {
    let pki = TestPki::new();
    let (mut client, _server) = failure(
        &pki.client_config(MQTT),
        &pki.server_config(MQTT),
        "broker.example",
    );
    let text = client
        .tls
        .take_error()
        .expect("client recorded the failure")
        .to_string();
    assert!(
        text.contains("server broker.example") && text.contains("hostname mismatch"),
        "{text}"
    );
}

#[test]
fn missing_client_certificate_is_alert_116() {
    let pki = TestPki::new();
    let server_cfg = ServerConfig::builder()
        .cert_chain_pem(pki.leaf_pem.as_bytes())
        .private_key_pem(pki.leaf_key_pem.as_bytes())
        .alpn(MQTT)
        .client_ca_pem(pki.ca_pem.as_bytes())
        .build()
        .unwrap();
    let (_client, mut server) = failure(&pki.client_config(MQTT), &server_cfg, "localhost");
    assert_eq!(server.tls.alert_sent(), Some(116));
    let text = server.tls.take_error().unwrap().to_string();
    assert!(
        text.contains("certificate_required") && text.contains("no certificate"),
        "{text}"
    );

    // With a certificate from the trusted CA the same server accepts the client.
    let (cert, key) = TestPki::issue(&pki.ca_cert, &pki.ca_key, &["device-42"]);
    let client_cfg = ClientConfig::builder()
        .ca_pem(pki.ca_pem.as_bytes())
        .alpn(MQTT)
        .client_cert_pem(cert.as_bytes(), key.as_bytes())
        .build()
        .unwrap();
    let (_c, _s, result) = pair(&client_cfg, &server_cfg);
    result.unwrap();
}

#[test]
fn a_panic_in_a_callback_becomes_an_error() {
    let pki = TestPki::new();
    let mut client = Side::client(&pki.client_config(MQTT), NGTCP2_PROTO_VER_V1, 0);
    client.tls.inject_panic("crypto_send");
    let err = client
        .send(0)
        .expect_err("the first flight cannot be written");
    assert_eq!(err, NGTCP2_ERR_CALLBACK_FAILURE);
    let text = client
        .tls
        .take_error()
        .expect("the panic was recorded")
        .to_string();
    assert!(
        text.contains("panicked") && text.contains("injected panic in crypto_send"),
        "{text}"
    );
}

#[test]
fn configuration_errors_name_the_file() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let err = ServerConfig::builder()
        .cert_chain_pem(pki.leaf_pem.as_bytes())
        .private_key_pem(other.leaf_key_pem.as_bytes())
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match the certificate"), "{err}");
    let err = ServerConfig::builder()
        .cert_chain_file("/nonexistent/mqttd/cert.pem")
        .private_key_pem(pki.leaf_key_pem.as_bytes())
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/mqttd/cert.pem"), "{err}");
    let err = ServerConfig::builder()
        .cert_chain_pem(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        .private_key_pem(pki.leaf_key_pem.as_bytes())
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid PEM"), "{err}");
}

/// OpenSSL names groups case-insensitively and reports some in lower case ("x25519").
fn assert_group(side: &Side, want: &str) {
    let got = side.tls.key_exchange_group();
    assert!(
        got.as_deref().is_some_and(|g| g.eq_ignore_ascii_case(want)),
        "negotiated {got:?}, expected {want}"
    );
}

#[test]
fn key_exchange_groups_default_hybrid_or_chosen() {
    let pki = TestPki::new();
    // Default on both sides: OpenSSL 3.5 negotiates the hybrid post-quantum group.
    let (client, server, result) = pair(&pki.client_config(MQTT), &pki.server_config(MQTT));
    result.unwrap();
    assert_group(&client, "X25519MLKEM768");
    assert_group(&server, "X25519MLKEM768");

    // A given group on one side (client X25519 only, server default) and on both sides.
    let x25519_client = ClientConfig::builder()
        .ca_pem(pki.ca_pem.as_bytes())
        .alpn(MQTT)
        .groups(&["X25519"])
        .build()
        .unwrap();
    let x25519_server = ServerConfig::builder()
        .cert_chain_pem(pki.leaf_pem.as_bytes())
        .private_key_pem(pki.leaf_key_pem.as_bytes())
        .alpn(MQTT)
        .groups(&["X25519"])
        .build()
        .unwrap();
    for server_cfg in [&pki.server_config(MQTT), &x25519_server] {
        let (client, server, result) = pair(&x25519_client, server_cfg);
        result.unwrap();
        assert_group(&client, "X25519");
        assert_group(&server, "X25519");
    }
    // Server prefers P-256 but accepts the client's default offer of X25519MLKEM768 after it:
    // the client's key share for a group the server accepts wins without a retry.
    let p256_server = ServerConfig::builder()
        .cert_chain_pem(pki.leaf_pem.as_bytes())
        .private_key_pem(pki.leaf_key_pem.as_bytes())
        .alpn(MQTT)
        .groups(&["P-256"])
        .build()
        .unwrap();
    let (client, server, result) = pair(&pki.client_config(MQTT), &p256_server);
    result.unwrap();
    assert_group(&client, "secp256r1");
    assert_group(&server, "secp256r1");

    // Disjoint lists: the server refuses with handshake_failure and says why.
    let (_client, mut server) = failure(&x25519_client, &p256_server, "localhost");
    assert_eq!(server.tls.alert_sent(), Some(40));
    let text = server.tls.take_error().unwrap().to_string();
    assert!(
        text.contains("alert 40 (handshake_failure)")
            && text.contains("no key exchange group in common with the client")
            && text.contains("it offered [x25519]")
            && text.contains("this server accepts [P-256]"),
        "{text}"
    );
}

#[test]
fn bad_group_names_fail_the_build() {
    let pki = TestPki::new();
    let err = ClientConfig::builder()
        .ca_pem(pki.ca_pem.as_bytes())
        .groups(&["X25519", "no-such-group"])
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("X25519:no-such-group") && err.contains("not accepted"),
        "{err}"
    );
    for bad in [&[][..], &["X25519:P-256"][..], &[""][..]] {
        let err = ServerConfig::builder()
            .cert_chain_pem(pki.leaf_pem.as_bytes())
            .private_key_pem(pki.leaf_key_pem.as_bytes())
            .groups(bad)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("key exchange group"), "{bad:?}: {err}");
    }
}
