//! Topic access control (`acl_file`, mosquitto's format) with password-authenticated users,
//! checked with mosquitto_sub/mosquitto_pub and rumqttc 5.0's reason codes.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use rumqttc::v5 as r5;
use rumqttc::v5::mqttbytes::v5::Packet as P5;

use crate::common::{Mqttd, WAIT, fails_to_start, fresh_dir, mosquitto, mqttd_passwd};

const ACL: &str = "\
# Clients without a username may read public/.
topic read public/#

user ops
topic readwrite #

user alice
topic fleet/#
topic deny fleet/secret/#

# Every client may write under its own client identifier.
pattern write devices/%c/#
";

fn setup(name: &str) -> (PathBuf, Mqttd) {
    let dir = fresh_dir(&format!("acl-{name}"));
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").expect("write passwd");
    for (user, pass) in [("ops", "ops pw"), ("alice", "alice pw")] {
        mqttd_passwd(&passwd, user, pass);
    }
    let acl = dir.join("acl");
    std::fs::write(&acl, ACL).expect("write acl");
    let broker = Mqttd::start(&[
        "--password-file",
        passwd.to_str().expect("utf-8"),
        "--acl-file",
        acl.to_str().expect("utf-8"),
    ]);
    (dir, broker)
}

/// What a rumqttc 5.0 event loop reports: packets, then the error that ended it (rumqttc ends
/// the connection on a refused subscription or publication, naming the reason code).
type Events = tokio::sync::mpsc::UnboundedReceiver<Result<P5, String>>;

/// A connected rumqttc 5.0 client and its events.
async fn v5(port: u16, id: &str, credentials: Option<(&str, &str)>) -> (r5::AsyncClient, Events) {
    let mut opts = r5::MqttOptions::new(id, "127.0.0.1", port);
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (client, mut el) = r5::AsyncClient::new(opts, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(r5::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:?}")));
                    return;
                }
            }
        }
    });
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(Ok(P5::ConnAck(a)))) => assert_eq!(
            a.code,
            r5::mqttbytes::v5::ConnectReturnCode::Success,
            "{id}"
        ),
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    (client, rx)
}

/// The next packet `pick` accepts (others skipped); `Err` with the error that ended the
/// connection instead.
async fn next<T>(rx: &mut Events, mut pick: impl FnMut(P5) -> Option<T>) -> Result<T, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(p))) => {
                if let Some(t) = pick(p) {
                    return Ok(t);
                }
            }
            Ok(Some(Err(e))) => return Err(e),
            other => panic!("no expected packet: {other:?}"),
        }
    }
}

fn suback(p: P5) -> Option<String> {
    match p {
        P5::SubAck(s) => Some(format!("{:?}", s.return_codes)),
        _ => None,
    }
}

fn delivery(p: P5) -> Option<r5::mqttbytes::v5::Publish> {
    match p {
        P5::Publish(p) => Some(p),
        _ => None,
    }
}

fn puback(p: P5) -> Option<String> {
    match p {
        P5::PubAck(a) => Some(format!("{:?}", a.reason)),
        _ => None,
    }
}

const QOS1: r5::mqttbytes::QoS = r5::mqttbytes::QoS::AtLeastOnce;
const ALICE: Option<(&str, &str)> = Some(("alice", "alice pw"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_rules_decide_who_subscribes_publishes_and_receives() {
    let (dir, broker) = setup("rules");
    let port = broker.port();
    // Refused subscriptions: Not Authorized in the SUBACK (rumqttc then ends the connection).
    for filter in ["fleet/secret/#", "public/#"] {
        let (c, mut rx) = v5(port, "alice-probe", ALICE).await;
        c.subscribe(filter, QOS1).await.expect("subscribe");
        let got = next(&mut rx, suback).await;
        assert!(
            got.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
            "{filter}: {got:?}"
        );
    }
    let (alice, mut alice_rx) = v5(port, "alice-1", ALICE).await;
    alice.subscribe("fleet/#", QOS1).await.expect("subscribe");
    assert_eq!(
        next(&mut alice_rx, suback).await,
        Ok("[Success(AtLeastOnce)]".into())
    );
    // ops writes everywhere; alice's fleet/# gets fleet/ok but never the secret part.
    let (ops, _ops_rx) = v5(port, "ops-1", Some(("ops", "ops pw"))).await;
    for (topic, payload) in [("fleet/secret/key", "hidden"), ("fleet/ok", "visible")] {
        ops.publish(topic, QOS1, false, payload)
            .await
            .expect("publish");
    }
    let p = next(&mut alice_rx, delivery).await.expect("a delivery");
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        (&b"fleet/ok"[..], &b"visible"[..])
    );
    // alice may publish under her own client identifier (a pattern) ...
    alice
        .publish("devices/alice-1/state", QOS1, false, "up")
        .await
        .expect("publish");
    assert_eq!(
        next(&mut alice_rx, puback).await,
        Ok("NoMatchingSubscribers".into()),
        "allowed, and nobody listens"
    );
    // ... but not outside fleet/: Not Authorized in the PUBACK.
    alice
        .publish("ops/x", QOS1, false, "no")
        .await
        .expect("publish");
    let got = next(&mut alice_rx, puback).await;
    assert!(
        got.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
        "{got:?}"
    );
    // alice's connection ended with the refused PUBACK (clean session: nothing left).
    drop(alice);
    tokio::task::block_in_place(|| broker.wait_metric("mqttd_subscriptions", |n| n == 0));
    // mosquitto_sub without a username reads public/ only.
    let sub = Command::new(mosquitto("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "public/#", "-C", "1", "-W", "15", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    tokio::task::block_in_place(|| broker.wait_metric("mqttd_subscriptions", |n| n == 1));
    ops.publish("public/news", QOS1, false, "for all")
        .await
        .expect("publish");
    let out = tokio::task::block_in_place(|| sub.wait_with_output()).expect("mosquitto_sub");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "public/news for all"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unusable_acl_file_stops_the_broker_naming_the_line() {
    let dir = fresh_dir("acl-bad");
    let acl = dir.join("acl");
    std::fs::write(&acl, "user alice\ntopic read fleet/#/x\n").expect("write");
    let stderr = fails_to_start(&["--acl-file", acl.to_str().expect("utf-8")]);
    assert!(
        stderr.contains(&format!(
            "{}:2: `fleet/#/x` is not a valid topic filter",
            acl.display()
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn hangup(broker: &Mqttd) {
    let ok = Command::new("kill")
        .args(["-HUP", &broker.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// The outcome of a 5.0 CONNECT with these credentials (the connection is dropped after).
async fn connack(port: u16, id: &str, user: &str, pass: &str) -> Result<(), String> {
    let mut opts = r5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_credentials(user, pass);
    let (_client, mut el) = r5::AsyncClient::new(opts, 10);
    match tokio::time::timeout(WAIT, el.poll()).await {
        Ok(Ok(r5::Event::Incoming(P5::ConnAck(_)))) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// SIGHUP reloads the password and ACL files, like mosquitto: a new user can connect, and a
/// connected client's topic rules change at once. A file that no longer loads keeps the
/// rules in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_password_and_acl_files() {
    let (dir, broker) = setup("reload");
    let port = broker.port();
    assert!(connack(port, "carol-1", "carol", "carol pw").await.is_err());
    let (alice, mut alice_rx) = v5(port, "alice-r", ALICE).await;
    alice.subscribe("fleet/#", QOS1).await.expect("subscribe");
    assert_eq!(
        next(&mut alice_rx, suback).await,
        Ok("[Success(AtLeastOnce)]".into())
    );
    // New files: carol exists; alice reads news/ and no longer fleet/.
    mqttd_passwd(&dir.join("passwd"), "carol", "carol pw");
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "user ops\ntopic readwrite #\nuser alice\ntopic news/#\n",
    )
    .expect("acl");
    hangup(&broker);
    // Bounded: the reload is asynchronous.
    let deadline = tokio::time::Instant::now() + WAIT;
    while connack(port, "carol-2", "carol", "carol pw").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "carol never got in");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (ops, _ops_rx) = v5(port, "ops-r", Some(("ops", "ops pw"))).await;
    ops.publish("fleet/a", QOS1, false, "no longer alice's")
        .await
        .expect("publish");
    alice.subscribe("news/#", QOS1).await.expect("subscribe");
    assert_eq!(
        next(&mut alice_rx, suback).await,
        Ok("[Success(AtLeastOnce)]".into())
    );
    ops.publish("news/b", QOS1, false, "alice's now")
        .await
        .expect("publish");
    // fleet/a was routed first: had it reached alice it would arrive first.
    let p = next(&mut alice_rx, delivery).await.expect("a delivery");
    assert_eq!(&p.topic[..], b"news/b");
    // A broken file is refused and the rules in force stay.
    std::fs::write(&acl, "topic read a/#/b\n").expect("acl");
    hangup(&broker);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (alice2, mut rx2) = v5(port, "alice-r2", ALICE).await;
    alice2.subscribe("news/#", QOS1).await.expect("subscribe");
    assert_eq!(
        next(&mut rx2, suback).await,
        Ok("[Success(AtLeastOnce)]".into()),
        "the previous rules are still in force"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
