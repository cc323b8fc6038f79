//! A safe QUIC transport on [ngtcp2](https://nghttp2.org/ngtcp2/) for tokio, used by the broker's
//! QUIC listener, the load generator and bridges.
//!
//! Two layers, as in quinn:
//! - [`proto`]: sans-IO. [`proto::Connection`] wraps one `ngtcp2_conn`; datagrams and time go in,
//!   datagrams to send, the next timer and application events come out. All `unsafe` code and
//!   every ngtcp2 callback live there (and in the private address helpers).
//! - the tokio layer: [`Endpoint`] owns the UDP socket (batched I/O with GSO/GRO and ECN through
//!   `quinn-udp`), routes datagrams by connection ID and runs one driver task per connection;
//!   [`Connection`], [`SendStream`] and [`RecvStream`] are the handles applications use.
//!
//! TLS comes from `mqttd-tls` (OpenSSL 3.5's QUIC API). This crate knows nothing of MQTT.
//!
//! # Example
//! ```no_run
//! # async fn demo(tls: mqttd_tls::ServerConfig, client_tls: mqttd_tls::ClientConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use mqttd_quic::{ClientConfig, Endpoint, ServerConfig};
//! let server = Endpoint::server(ServerConfig::new(tls), "127.0.0.1:14567".parse()?)?;
//! tokio::spawn(async move {
//!     while let Some(incoming) = server.accept().await {
//!         let Ok(conn) = incoming.await else { continue };
//!         let Ok((mut send, mut recv)) = conn.accept_bi().await else { continue };
//!         let data = recv.read_to_end(1 << 20).await.unwrap_or_default();
//!         let _ = send.write_all(&data).await;
//!         let _ = send.finish();
//!     }
//! });
//! let client = Endpoint::client("127.0.0.1:0".parse()?)?;
//! let conn = client
//!     .connect(&ClientConfig::new(client_tls), "127.0.0.1:14567".parse()?, "localhost")?
//!     .await?;
//! let (mut send, mut recv) = conn.open_bi().await?;
//! send.write_all(b"hello").await?;
//! send.finish()?;
//! assert_eq!(recv.read_to_end(100).await?, b"hello");
//! # Ok(()) }
//! ```
//!
//! # Proof
//! `tests/`: two sans-IO connections in memory with loss (`proto_memory`), loopback endpoints
//! (`endpoint`, `features`), interop with quinn 0.11 both ways (`interop_quinn`), hostile input
//! and anti-amplification (`hostile`), a lossy reordering relay and stateless reset
//! (`lossy_relay`), server-side early acceptance answering 0-RTT data one round trip sooner
//! through a delaying relay (`early_data`), migration off (`migration_off`).
//! `cargo bench -p mqttd-quic --bench quic` compares throughput, handshakes per second and
//! idle memory with quinn in one run.

mod addr;
mod config;
mod connection;
mod endpoint;
pub mod proto;
mod stream;
use mqttd_tls as tls;

pub use config::{
    ClientConfig, CongestionControl, MAX_UDP_PAYLOAD, ServerConfig, TransportConfig, Version,
};
pub use connection::{Connecting, Connection, SendDatagramError, ZeroRttAccepted};
pub use endpoint::{Endpoint, EndpointStats};
pub use proto::{ConnectionError, Stats, StreamError, StreamId};
pub use stream::{ReadToEndError, RecvStream, SendStream};
