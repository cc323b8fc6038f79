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

mod addr;
mod config;
mod connection;
mod endpoint;
pub mod proto;
mod stream;
use mqttd_tls as tls;

pub use config::{ClientConfig, CongestionControl, ServerConfig, TransportConfig, Version};
pub use connection::{Connecting, Connection, SendDatagramError, ZeroRttAccepted};
pub use endpoint::{Endpoint, EndpointStats};
pub use proto::{ConnectionError, Stats, StreamError, StreamId};
pub use stream::{ReadToEndError, RecvStream, SendStream};
