//! What a run does, independent of how it was asked for: who publishes where, who subscribes to
//! what and expects which publishers, and the message workload.

use std::time::Duration;

use mqttd_codec::{QoS, Topic, TopicFilter};

/// One publishing client.
#[derive(Debug, Clone)]
pub struct PubSpec {
    /// Where it publishes.
    pub topic: Topic,
}

/// One subscribing client.
#[derive(Debug, Clone)]
pub struct SubSpec {
    /// What it subscribes to.
    pub filter: TopicFilter,
    /// Indices of the publishers (in [`Plan::publishers`]) whose every message it should get;
    /// `None` when the publishers are not part of this run (`sub`), so only gaps are visible.
    pub expects: Option<Vec<u32>>,
}

/// The messages each publisher sends.
#[derive(Debug, Clone)]
pub struct Workload {
    /// QoS of PUBLISH and SUBSCRIBE.
    pub qos: QoS,
    /// Payload bytes.
    pub size: usize,
    /// Messages per second per publisher; 0 = unlimited.
    pub rate: f64,
    /// Unacknowledged QoS 1/2 PUBLISHes per publisher.
    pub inflight: u16,
    /// How long publishing lasts at most (or, for idle runs, how long connections are held).
    pub duration: Duration,
    /// Messages per publisher, if bounded by count.
    pub count: Option<u64>,
    /// Time allowed after publishing for acknowledgements and deliveries to finish.
    pub drain: Duration,
    /// The drain ends early after this long without a delivery.
    pub drain_idle: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            qos: QoS::AtMostOnce,
            size: 64,
            rate: 0.0,
            inflight: 64,
            duration: Duration::from_secs(10),
            count: None,
            drain: Duration::from_secs(5),
            drain_idle: Duration::from_secs(1),
        }
    }
}

/// Messages or idle connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Publishers and subscribers exchange messages.
    Messages,
    /// Clients connect and stay idle (`conn`, `conn-storm`).
    Idle {
        /// How many.
        clients: u32,
    },
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Name in reports (`fan-in`, `pub`, ...).
    pub scenario: String,
    /// Messages or idle connections.
    pub kind: Kind,
    /// Publishing clients.
    pub publishers: Vec<PubSpec>,
    /// Subscribing clients.
    pub subscribers: Vec<SubSpec>,
    /// The workload.
    pub load: Workload,
    /// For `sub`: stop after this many messages over all subscribers.
    pub receive_count: Option<u64>,
}

impl Plan {
    /// A message run.
    pub fn messages(
        scenario: &str,
        publishers: Vec<PubSpec>,
        subscribers: Vec<SubSpec>,
        load: Workload,
    ) -> Self {
        Self {
            scenario: scenario.to_string(),
            kind: Kind::Messages,
            publishers,
            subscribers,
            load,
            receive_count: None,
        }
    }

    /// An idle-connection run holding `clients` connections for `hold`.
    pub fn idle(scenario: &str, clients: u32, hold: Duration) -> Self {
        Self {
            scenario: scenario.to_string(),
            kind: Kind::Idle { clients },
            publishers: Vec::new(),
            subscribers: Vec::new(),
            load: Workload {
                duration: hold,
                ..Workload::default()
            },
            receive_count: None,
        }
    }
}
