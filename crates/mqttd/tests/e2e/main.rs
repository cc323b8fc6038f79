//! End-to-end tests: the real `mqttd` binary on free loopback ports, driven by independent
//! clients (rumqttc 3.1.1 and 5.0, mosquitto_pub/mosquitto_sub) and by raw bytes.
//! One test binary, so the crate's tests link once.

mod acl;
mod auth;
mod bad;
mod cli;
mod clients;
mod common;
mod mosq;
mod tls;
