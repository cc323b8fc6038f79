//! The sans-IO layer: protocol state fed with datagrams and time, drained of datagrams, timers
//! and events. No sockets, no clock, no tasks (the quinn-proto shape); the tokio layer
//! ([`Endpoint`](crate::Endpoint)) drives it.

mod connection;
pub mod packet;
mod types;

pub(crate) use connection::reset_token;
pub use connection::{
    ConnectError, Connection, EndpointEvent, Event, InitialInfo, Stats, StreamError,
};
pub use types::{ConnectionError, ConnectionId, Dir, Ecn, Path, Side, StreamId, Transmit};
