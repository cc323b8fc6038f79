//! # mqttd-bench
//!
//! An MQTT load generator in the spirit of emqtt-bench, usable against any broker: the
//! `mqttd-bench` binary's subcommands `pub`, `sub` and `conn`, and the scenario presets
//! `fan-in`, `fan-out`, `pairs` and `conn-storm`.
//!
//! It measures, per run: PUBLISHes sent and deliveries received per second; end-to-end latency
//! from a send timestamp carried in each payload, in an HDR histogram; loss and duplicates from
//! per-publisher sequence numbers, also in each payload; connects per second and CONNACK
//! latency; and, given the broker's pid, its CPU and resident memory from `/proc`, next to the
//! generator's own CPU (so a run shows whether the generator or the broker was the limit).
//!
//! Every run is bounded: it stops after its duration or message count, then drains for a
//! bounded time.
//!
//! Layout: [`cli`] parses arguments into a [`plan::Plan`]; [`run`] connects the clients and
//! drives them; [`client`] is one client's connection and loop; [`payload`] the payload header
//! and the pre-encoded PUBLISH; [`accounting`] loss, duplicates and the latency histogram;
//! [`hol`] the head-of-line benchmark through a lossy relay; [`procstat`] the `/proc` sampling; [`report`] the progress line and summary; [`transport`]
//! the byte-stream abstraction (TCP, and MQTT over QUIC in single-stream mode).
//!
//! What it must not do: it is not a conformance tester (it checks only what it needs to count
//! correctly), and it never sends traffic anywhere but the broker address it is given.

pub mod accounting;
pub mod cli;
pub mod client;
pub mod hol;
pub mod payload;
pub mod plan;
pub mod procstat;
pub mod report;
pub mod run;
pub mod transport;
