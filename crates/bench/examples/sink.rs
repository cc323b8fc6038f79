//! A trivial MQTT endpoint for measuring `mqttd-bench` itself: it routes nothing, so whatever
//! rate the generator reaches against it is the generator's own ceiling.
//!
//! - CONNECT gets a CONNACK, PINGREQ a PINGRESP, SUBSCRIBE a SUBACK granting the asked QoS.
//! - PUBLISH is discarded; QoS 1 gets a PUBACK, QoS 2 a PUBREC (and PUBREL a PUBCOMP).
//! - After a SUBSCRIBE, the sink streams QoS 0 benchmark messages (64-byte payloads with the
//!   usual header) on that filter as fast as the socket takes them, so `mqttd-bench sub` measures
//!   the generator's receive path.
//!
//! ```text
//! cargo run --release -p mqttd-bench --example sink -- 127.0.0.1:18999
//! mqttd-bench pub -p 18999 -c 4 -q 1 -d 5     # publish ceiling
//! mqttd-bench sub -p 18999 -c 1 -d 5          # receive ceiling
//! ```

use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::BytesMut;
use mqttd_bench::payload::{Header, PublishTemplate, now_ns};
use mqttd_codec::{
    AckProperties, ConnAck, Packet, PubAck, PubComp, PubRec, QoS, ReasonCode, SubAck, Topic,
    decode_connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18999".to_string())
        .parse()
        .context("usage: sink [ADDR:PORT]")?;
    let listener = TcpListener::bind(addr).await?;
    println!("sink listening on {}", listener.local_addr()?);
    let mut n = 0u32;
    loop {
        let (stream, _) = listener.accept().await?;
        n += 1;
        let index = n;
        tokio::spawn(async move {
            if let Err(e) = serve(stream, index).await {
                eprintln!("sink: connection {index}: {e:#}");
            }
        });
    }
}

async fn serve(stream: TcpStream, index: u32) -> Result<()> {
    stream.set_nodelay(true)?;
    let (mut r, mut w) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let connect = loop {
        if let Some(c) = decode_connect(&mut rbuf, 1 << 20)? {
            break c;
        }
        if r.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    };
    let version = connect.protocol_version;
    Packet::ConnAck(Box::new(ConnAck::new(ReasonCode::Success))).encode(version, &mut wbuf)?;
    w.write_all_buf(&mut wbuf).await?;
    let mut stream_topic: Option<PublishTemplate> = None;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            n = r.read_buf(&mut rbuf) => {
                if n? == 0 {
                    return Ok(());
                }
                while let Some(p) = mqttd_codec::decode(&mut rbuf, version, 1 << 20)? {
                    let reply = match p {
                        Packet::Publish(p) => match (p.qos, p.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubAck::new(id))),
                            (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(PubRec::new(id))),
                            _ => None,
                        },
                        Packet::PubRel(rel) => Some(Packet::PubComp(PubComp::new(rel.packet_id))),
                        Packet::PingReq => Some(Packet::PingResp),
                        Packet::Subscribe(s) => {
                            let filter = s.filters.first().map(|f| f.filter.as_str().to_string());
                            let name = filter
                                .filter(|f| !f.contains(['+', '#']))
                                .unwrap_or_else(|| "sink/stream".to_string());
                            stream_topic = Some(PublishTemplate::new(
                                Topic::new(&name).map_err(|e| anyhow::anyhow!("{e}"))?,
                                QoS::AtMostOnce,
                                64,
                                version,
                            )?);
                            let codes = s.filters.iter().map(|f| match f.options.qos {
                                QoS::AtMostOnce => ReasonCode::GRANTED_QOS0,
                                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                            });
                            Some(Packet::SubAck(SubAck {
                                packet_id: s.packet_id,
                                reason_codes: codes.collect(),
                                properties: AckProperties::default(),
                            }))
                        }
                        Packet::Disconnect(_) => return Ok(()),
                        _ => None,
                    };
                    if let Some(reply) = reply {
                        reply.encode(version, &mut wbuf)?;
                    }
                }
                rbuf.reserve(64 * 1024);
                if !wbuf.is_empty() {
                    w.write_all_buf(&mut wbuf).await?;
                }
            }
            res = w.writable(), if stream_topic.is_some() => {
                res?;
                if let Some(t) = &stream_topic {
                    while wbuf.len() < 64 * 1024 {
                        t.write(&mut wbuf, 0, &Header { publisher: index, seq, sent_ns: now_ns() });
                        seq += 1;
                    }
                }
                w.write_all_buf(&mut wbuf).await?;
            }
        }
    }
}
