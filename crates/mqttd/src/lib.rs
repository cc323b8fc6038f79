//! mqttd: an MQTT 3.1.1 and 5.0 broker.
//!
//! The protocol logic (sessions, QoS state machines, the router, retained messages) is sans-IO:
//! plain structs fed with decoded packets and the current time, drained of packets to send.
//! The tokio side (listeners, connection tasks, the HTTP endpoint, signals) only moves bytes and
//! events. This crate must not put I/O or clocks into the core modules.

pub mod acl;
pub mod auth;
pub mod broker;
pub mod client;
pub mod config;
pub mod http;
pub mod message;
pub mod metrics;
pub mod quic;
pub mod retain;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod store_redb;
pub mod tls_listener;
