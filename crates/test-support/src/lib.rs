//! Test support shared by the workspace's integration tests (a dev-dependency, not published).
//!
//! [`Relay`] is a UDP relay on loopback between one client and one server that models the link
//! between them: a fixed one-way delay, seeded loss and reordering, and a gate that holds back
//! what the client sends once it has heard the server's handshake reply — so "the answer came
//! one round trip after the first flight" is checked by causality, not by a stopwatch.
//! [`Rng`] is the small seeded generator behind the relay's decisions, for tests too.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A seeded xorshift64* generator: reproducible drop and delay decisions and test data.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits. (Not an `Iterator`: the stream never ends and callers mix it
    /// with [`chance`](Self::chance) and [`bytes`](Self::bytes).)
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// True with a probability of `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// What the link does to each datagram, in both directions.
#[derive(Clone, Debug)]
pub struct Link {
    /// Added to every datagram: a round trip takes at least twice that. Datagrams with the same
    /// delay leave in the order they arrived.
    pub one_way: Duration,
    /// Percent of datagrams dropped.
    pub loss_percent: u64,
    /// Percent of the datagrams not dropped that wait an extra 1 ms to [`reorder_max`]
    /// (whole milliseconds), so that later datagrams overtake them.
    ///
    /// [`reorder_max`]: Link::reorder_max
    pub reorder_percent: u64,
    /// Upper bound of the extra delay of reordered datagrams.
    pub reorder_max: Duration,
    /// Seed of the drop and reorder decisions.
    pub seed: u64,
}

impl Link {
    /// A link that delays every datagram by `one_way` and neither drops nor reorders.
    pub fn delay(one_way: Duration) -> Link {
        Link {
            one_way,
            loss_percent: 0,
            reorder_percent: 0,
            reorder_max: Duration::ZERO,
            seed: 1,
        }
    }

    /// A link without base delay that drops `loss_percent` of datagrams and holds a quarter of
    /// the rest back by 1-15 ms (which reorders them), decided by `seed`.
    pub fn lossy(loss_percent: u64, seed: u64) -> Link {
        Link {
            one_way: Duration::ZERO,
            loss_percent,
            reorder_percent: 25,
            reorder_max: Duration::from_millis(15),
            seed,
        }
    }
}

/// Datagram counts of a [`Relay`] (both directions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams the relay received.
    pub received: u64,
    /// Of those, dropped by the link's loss.
    pub dropped: u64,
    /// Datagrams the gate holds right now.
    pub held: usize,
}

/// The gate of [`Relay::hold_after_reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// Everything passes.
    Open,
    /// Everything passes until a long-header datagram of the server reaches the client.
    Armed,
    /// The client has heard the server: what it sends now is held.
    Holding,
    /// What the server sends is held.
    HoldingServer,
}

struct State {
    client: Option<SocketAddr>,
    gate: Gate,
    /// Held datagrams and whether each goes to the client.
    held: Vec<(Vec<u8>, bool)>,
    received: u64,
    dropped: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Tie-break of equal due times: arrival order.
    seq: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons nothing the relay cannot keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A datagram waiting for its departure time.
struct Pending {
    due: Instant,
    seq: u64,
    data: Vec<u8>,
    to: SocketAddr,
    to_client: bool,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Reversed: the earliest departure is the greatest (top of the max-heap).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// A UDP relay in front of one server on loopback. The client is whoever last sent from an
/// address other than the server's; the server's datagrams go to it. Both directions pass
/// through the same [`Link`]. The relay's tasks end when it is dropped.
pub struct Relay {
    addr: SocketAddr,
    server: SocketAddr,
    one_way: Duration,
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Pending>,
    tasks: [JoinHandle<()>; 2],
}

impl Relay {
    /// Binds a loopback port and starts relaying to `server` through `link`.
    ///
    /// Panics if no loopback UDP port can be bound (a test environment failure).
    pub async fn start(server: SocketAddr, link: Link) -> Relay {
        let sock = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the relay on loopback"),
        );
        let addr = sock.local_addr().expect("the relay's address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                client: None,
                gate: Gate::Open,
                held: Vec::new(),
                received: 0,
                dropped: 0,
            }),
            seq: AtomicU64::new(0),
        });
        let (queue, pending) = mpsc::unbounded_channel();
        let deliver = tokio::spawn(deliver(sock.clone(), pending, shared.clone()));
        let receive = tokio::spawn(receive(
            sock,
            server,
            link.clone(),
            shared.clone(),
            queue.clone(),
        ));
        Relay {
            addr,
            server,
            one_way: link.one_way,
            shared,
            queue,
            tasks: [deliver, receive],
        }
    }

    /// Where the client sends.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms the gate: from the moment a long-header datagram of the server (its handshake
    /// reply to a new connection) has been passed on to the client, every datagram the client
    /// sends is held until [`release`](Self::release). What the server still receives is the
    /// client's first flight — everything sent before it could have heard the server — so an
    /// answer that reaches the client while the gate holds came from the first flight alone:
    /// one round trip. Short-header datagrams (an earlier, established connection) do not
    /// close the gate.
    pub fn hold_after_reply(&self) {
        let mut st = self.shared.lock();
        st.gate = Gate::Armed;
    }

    /// Holds every datagram of the server until [`release`](Self::release): the client cannot
    /// hear anything (its handshake cannot complete) while the test does what must happen
    /// before — e.g. open a stream that is then certainly a 0-RTT stream.
    pub fn hold_server(&self) {
        let mut st = self.shared.lock();
        st.gate = Gate::HoldingServer;
    }

    /// Opens the gate: the held datagrams leave in order, one `one_way` from now, and nothing
    /// more is held.
    pub fn release(&self) {
        let (held, client) = {
            let mut st = self.shared.lock();
            st.gate = Gate::Open;
            (std::mem::take(&mut st.held), st.client)
        };
        let due = Instant::now() + self.one_way;
        for (data, to_client) in held {
            let to = match (to_client, client) {
                (false, _) => self.server,
                (true, Some(c)) => c,
                (true, None) => continue,
            };
            let seq = self.shared.seq.fetch_add(1, AtomicOrdering::Relaxed);
            let _ = self.queue.send(Pending {
                due,
                seq,
                data,
                to,
                to_client,
            });
        }
    }

    /// Datagram counts so far.
    pub fn counts(&self) -> Counts {
        let st = self.shared.lock();
        Counts {
            received: st.received,
            dropped: st.dropped,
            held: st.held.len(),
        }
    }

    /// Waits until the gate holds at least one datagram, up to `limit`; returns how many it
    /// holds (0 if none came in time).
    pub async fn wait_held(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let held = self.counts().held;
            if held > 0 || Instant::now() >= deadline {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Whether `datagram` starts with a QUIC long header (Initial, 0-RTT, Handshake, Retry,
/// Version Negotiation).
fn long_header(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0x80 != 0)
}

/// Reads datagrams, applies the link's loss and the gate, and queues the rest.
async fn receive(
    sock: Arc<UdpSocket>,
    server: SocketAddr,
    link: Link,
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Pending>,
) {
    let mut rng = Rng(link.seed | 1);
    let reorder_ms = link.reorder_max.as_millis().max(1) as u64;
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = sock.recv_from(&mut buf).await {
        let to_client = from == server;
        let to = {
            let mut st = shared.lock();
            st.received += 1;
            if rng.chance(link.loss_percent) {
                st.dropped += 1;
                continue;
            }
            if to_client {
                if st.gate == Gate::HoldingServer {
                    st.held.push((buf[..n].to_vec(), true));
                    continue;
                }
                match st.client {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                st.client = Some(from);
                if st.gate == Gate::Holding {
                    st.held.push((buf[..n].to_vec(), false));
                    continue;
                }
                server
            }
        };
        let mut delay = link.one_way;
        if link.reorder_percent > 0 && rng.chance(link.reorder_percent) {
            delay += Duration::from_millis(1 + rng.next() % reorder_ms);
        }
        let pending = Pending {
            due: Instant::now() + delay,
            seq: shared.seq.fetch_add(1, AtomicOrdering::Relaxed),
            data: buf[..n].to_vec(),
            to,
            to_client,
        };
        if queue.send(pending).is_err() {
            return;
        }
    }
}

/// Sends each queued datagram at its due time; closes an armed gate when a long-header
/// datagram of the server leaves for the client.
async fn deliver(
    sock: Arc<UdpSocket>,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    shared: Arc<Shared>,
) {
    let mut heap = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|p: &Pending| p.due);
        tokio::select! {
            item = queue.recv() => match item {
                Some(p) => heap.push(p),
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|p| p.due <= now) {
                    let Some(p) = heap.pop() else { break };
                    if p.to_client && long_header(&p.data) {
                        let mut st = shared.lock();
                        if st.gate == Gate::Armed {
                            st.gate = Gate::Holding;
                        }
                    }
                    let _ = sock.send_to(&p.data, p.to).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
            .await
            .expect("a datagram in time")
            .expect("recv");
        (buf[..n].to_vec(), from)
    }

    async fn pair() -> (UdpSocket, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        (server, client)
    }

    #[tokio::test]
    async fn delays_each_direction_and_keeps_order() {
        let (server, client) = pair().await;
        let one_way = Duration::from_millis(50);
        let relay = Relay::start(server.local_addr().expect("addr"), Link::delay(one_way)).await;
        let start = Instant::now();
        for i in 0..10u8 {
            client.send_to(&[i], relay.addr()).await.expect("send");
        }
        for i in 0..10u8 {
            let (d, from) = recv(&server).await;
            assert_eq!(d, [i], "in order");
            assert_eq!(from, relay.addr());
        }
        assert!(start.elapsed() >= one_way);
        server.send_to(b"back", relay.addr()).await.expect("send");
        assert_eq!(recv(&client).await.0, b"back");
        assert!(
            start.elapsed() >= one_way * 2,
            "a round trip takes two delays"
        );
        assert_eq!(relay.counts().received, 11);
    }

    #[tokio::test]
    async fn drops_the_configured_share() {
        let (server, client) = pair().await;
        let relay = Relay::start(server.local_addr().expect("addr"), Link::lossy(100, 7)).await;
        for _ in 0..20 {
            client.send_to(b"x", relay.addr()).await.expect("send");
        }
        let deadline = Instant::now() + WAIT;
        while relay.counts().received < 20 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            relay.counts(),
            Counts {
                received: 20,
                dropped: 20,
                held: 0
            }
        );
    }

    #[tokio::test]
    async fn gate_holds_what_the_client_sends_after_a_long_header_reply() {
        let (server, client) = pair().await;
        let relay = Relay::start(
            server.local_addr().expect("addr"),
            Link::delay(Duration::ZERO),
        )
        .await;
        relay.hold_after_reply();
        client.send_to(b"first", relay.addr()).await.expect("send");
        assert_eq!(recv(&server).await.0, b"first");
        // A short-header datagram (an established connection) leaves the gate armed.
        server
            .send_to(&[0x40, 1], relay.addr())
            .await
            .expect("send");
        assert_eq!(recv(&client).await.0, [0x40, 1]);
        client
            .send_to(b"still first", relay.addr())
            .await
            .expect("send");
        assert_eq!(recv(&server).await.0, b"still first");
        // The server's handshake reply (long header) reaches the client: the gate closes.
        server
            .send_to(&[0xC0, 2], relay.addr())
            .await
            .expect("send");
        assert_eq!(recv(&client).await.0, [0xC0, 2]);
        client.send_to(b"second", relay.addr()).await.expect("send");
        client.send_to(b"third", relay.addr()).await.expect("send");
        let deadline = Instant::now() + WAIT;
        while relay.counts().held < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(relay.counts().held, 2);
        // The server still reaches the client.
        server.send_to(b"answer", relay.addr()).await.expect("send");
        assert_eq!(recv(&client).await.0, b"answer");
        relay.release();
        assert_eq!(recv(&server).await.0, b"second");
        assert_eq!(recv(&server).await.0, b"third");
        client.send_to(b"after", relay.addr()).await.expect("send");
        assert_eq!(recv(&server).await.0, b"after");
        assert_eq!(relay.counts().held, 0);
    }

    #[tokio::test]
    async fn hold_server_holds_everything_the_server_sends_until_release() {
        let (server, client) = pair().await;
        let relay = Relay::start(
            server.local_addr().expect("addr"),
            Link::delay(Duration::ZERO),
        )
        .await;
        client.send_to(b"hello", relay.addr()).await.expect("send");
        assert_eq!(recv(&server).await.0, b"hello");
        relay.hold_server();
        server.send_to(b"one", relay.addr()).await.expect("send");
        server.send_to(b"two", relay.addr()).await.expect("send");
        // The client still reaches the server.
        client.send_to(b"up", relay.addr()).await.expect("send");
        assert_eq!(recv(&server).await.0, b"up");
        let deadline = Instant::now() + WAIT;
        while relay.counts().held < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(relay.counts().held, 2);
        relay.release();
        assert_eq!(recv(&client).await.0, b"one");
        assert_eq!(recv(&client).await.0, b"two");
        assert_eq!(relay.counts().held, 0);
    }
}
