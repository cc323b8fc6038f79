//! Runs a [`Plan`]: connects every client (paced by the connect rate and concurrency), starts
//! all publishers at once when every subscriber holds its subscription, stops by duration or
//! count, drains, and builds the [`Summary`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

use crate::accounting::{Percentiles, Receipts, new_histogram};
use crate::cli::{ConnectOpts, OutputOpts};
use crate::client::{
    Conn, Counters, PubOutcome, SubOutcome, hold_idle, run_publisher, run_subscriber,
};
use crate::payload::PublishTemplate;
use crate::plan::{Kind, Plan};
use crate::procstat::{Proc, Sample, cpu_percent, cpu_secs_precise};
use crate::report::{BrokerUsage, Summary, progress};
use crate::transport::Transport;

/// Spaces connection attempts by the connect rate and bounds how many are in progress.
#[derive(Clone)]
struct Pacer {
    t0: Instant,
    rate: u32,
    slots: Arc<Semaphore>,
}

impl Pacer {
    fn new(opts: &ConnectOpts) -> Self {
        Self {
            t0: Instant::now(),
            rate: opts.connect_rate,
            slots: Arc::new(Semaphore::new(opts.connect_concurrency.max(1))),
        }
    }

    /// Waits for the `k`-th client's turn.
    async fn admit(&self, k: u64) -> Option<OwnedSemaphorePermit> {
        if self.rate > 0 {
            sleep_until(self.t0 + Duration::from_secs_f64(k as f64 / f64::from(self.rate))).await;
        }
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// Everything a client task needs to connect.
#[derive(Clone)]
struct Dial<T: Transport> {
    transport: T,
    addr: SocketAddr,
    /// Shared, not copied into every client's task.
    opts: Arc<ConnectOpts>,
    pacer: Pacer,
    counters: Arc<Counters>,
}

impl<T: Transport> Dial<T> {
    /// Connects client number `k` (for pacing) named `role-n`; returns the connection and the
    /// time from its first packet to its CONNACK.
    async fn connect(&self, k: u64, role: &str, n: u32) -> Result<(Conn<T>, Duration)> {
        let permit = self.pacer.admit(k).await;
        let id = format!("{}-{role}-{n}", self.opts.client_id_prefix);
        let conn = Conn::connect(
            &self.transport,
            self.addr,
            self.opts.mqtt.protocol(),
            &id,
            self.opts.keep_alive,
            self.opts.persistent,
        )
        .await?;
        drop(permit);
        self.counters.connected.fetch_add(1, Relaxed);
        let took = conn.began.elapsed();
        Ok((conn, took))
    }
}

/// Resolves the broker address.
pub async fn resolve(opts: &ConnectOpts) -> Result<SocketAddr> {
    tokio::net::lookup_host((opts.host.as_str(), opts.port))
        .await
        .with_context(|| format!("cannot resolve {}", opts.host))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", opts.host))
}

/// Runs `plan` over `transport`.
pub async fn run<T: Transport>(
    transport: T,
    plan: Plan,
    connect: ConnectOpts,
    output: OutputOpts,
) -> Result<Summary> {
    run_with(transport, plan, connect, output, None).await
}

/// [`run`], with the subscribers' tasks on `subscribers` (another runtime) when given.
pub async fn run_with<T: Transport>(
    transport: T,
    plan: Plan,
    connect: ConnectOpts,
    output: OutputOpts,
    subscribers: Option<tokio::runtime::Handle>,
) -> Result<Summary> {
    let addr = resolve(&connect).await?;
    let transport_name = transport.name();
    let counters = Arc::new(Counters::default());
    let broker = output.broker_pid.map(Proc::Pid);
    if let (Some(pid), Some(b)) = (output.broker_pid, broker) {
        b.sample()
            .ok_or_else(|| anyhow!("--broker-pid {pid}: cannot read /proc/{pid}"))?;
    }
    let (stop_progress, stop_progress_rx) = watch::channel(false);
    let ticker = tokio::spawn(progress(
        counters.clone(),
        Duration::from_millis(output.interval_ms),
        output.json,
        broker,
        stop_progress_rx,
    ));
    let dial = Dial {
        transport,
        addr,
        opts: Arc::new(connect.clone()),
        pacer: Pacer::new(&connect),
        counters: counters.clone(),
    };
    let mut summary = match plan.kind {
        Kind::Messages => run_messages(dial, &plan, broker, subscribers).await?,
        Kind::Idle { clients } => run_idle(dial, &plan, clients, broker).await?,
    };
    let _ = stop_progress.send(true);
    let rss_max = ticker.await.unwrap_or(0);
    if let Some(b) = summary.broker.as_mut() {
        b.rss_max_kib = b.rss_max_kib.max(rss_max);
    }
    summary.kind = "summary";
    summary.scenario = plan.scenario.clone();
    summary.transport = transport_name;
    summary.mqtt = connect.mqtt.label();
    summary.qos = plan.load.qos as u8;
    Ok(summary)
}

fn usage(pid: Option<Proc>, from: Option<Sample>, to: Option<Sample>) -> Option<BrokerUsage> {
    let (Some(Proc::Pid(pid)), Some(from), Some(to)) = (pid, from, to) else {
        return None;
    };
    Some(BrokerUsage {
        pid,
        cpu_pct: cpu_percent(&from, &to),
        rss_start_kib: from.rss_kib,
        rss_end_kib: to.rss_kib,
        rss_max_kib: from.rss_kib.max(to.rss_kib),
        rss_per_conn_bytes: None,
    })
}

fn bench_cpu(from: Option<Sample>, to: Option<Sample>) -> f64 {
    match (from, to) {
        (Some(a), Some(b)) => cpu_percent(&a, &b),
        _ => 0.0,
    }
}

/// Collects connect results: the CONNACK latencies and the errors.
#[derive(Default)]
struct Readiness {
    latency: Option<hdrhistogram::Histogram<u64>>,
    ok: u64,
    errors: Vec<String>,
}

/// Connect results gathered from every client without waking the collecting task once per
/// client (a channel did: in a storm of thousands of connects that is a wake-up, often of
/// another thread, per connect): each client records under a short lock, and the last one
/// wakes the waiter.
struct Tally {
    state: std::sync::Mutex<Readiness>,
    pending: AtomicUsize,
    done: Notify,
}

impl Tally {
    fn new(clients: usize) -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new(Readiness {
                latency: Some(new_histogram()),
                ..Readiness::default()
            }),
            pending: AtomicUsize::new(clients),
            done: Notify::new(),
        })
    }

    /// A guard for one client: it reports once, and reports a failure if dropped without
    /// having reported (the client's task ended some other way).
    fn entry(self: &Arc<Self>) -> TallyEntry {
        TallyEntry(Some(self.clone()))
    }

    fn record(&self, result: Result<Duration, String>) {
        {
            let mut r = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(d) => {
                    r.ok += 1;
                    if let Some(h) = r.latency.as_mut() {
                        h.saturating_record((d.as_micros() as u64).max(1));
                    }
                }
                Err(e) => r.errors.push(e),
            }
        }
        if self.pending.fetch_sub(1, Relaxed) == 1 {
            // `notify_one` keeps a permit when nobody waits yet: no lost wake-up.
            self.done.notify_one();
        }
    }

    /// Waits until every client reported; returns the results.
    async fn wait(&self) -> Readiness {
        if self.pending.load(Relaxed) > 0 {
            self.done.notified().await;
        }
        std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One client's pending report to a [`Tally`].
struct TallyEntry(Option<Arc<Tally>>);

impl TallyEntry {
    fn report(mut self, result: Result<Duration, String>) {
        if let Some(t) = self.0.take() {
            t.record(result);
        }
    }
}

impl Drop for TallyEntry {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.record(Err("a client's task ended before it connected".into()));
        }
    }
}

impl Readiness {
    fn latency(&self) -> Percentiles {
        self.latency
            .as_ref()
            .map(Percentiles::of)
            .unwrap_or_default()
    }
}

async fn run_messages<T: Transport>(
    dial: Dial<T>,
    plan: &Plan,
    broker: Option<Proc>,
    subscribers: Option<tokio::runtime::Handle>,
) -> Result<Summary> {
    let sub_runtime = subscribers.unwrap_or_else(tokio::runtime::Handle::current);
    let load = plan.load.clone();
    let version = dial.opts.mqtt.protocol();
    let templates = plan
        .publishers
        .iter()
        .map(|p| PublishTemplate::new(p.topic.clone(), load.qos, load.size, version))
        .collect::<Result<Vec<_>>>()?;
    let n_clients = plan.publishers.len() + plan.subscribers.len();
    let tally = Tally::new(n_clients);
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_began = Instant::now();

    let mut subs: Vec<JoinHandle<SubOutcome>> = Vec::new();
    for (i, spec) in plan.subscribers.iter().enumerate() {
        let (dial, ready, stop, filter, qos) = (
            dial.clone(),
            tally.entry(),
            stop_rx.clone(),
            spec.filter.clone(),
            load.qos,
        );
        subs.push(sub_runtime.spawn(async move {
            let attempt = async {
                let (mut conn, took) = dial.connect(i as u64, "sub", i as u32 + 1).await?;
                conn.subscribe(filter, qos).await?;
                Ok::<_, anyhow::Error>((conn, took))
            };
            match attempt.await {
                Ok((conn, took)) => {
                    ready.report(Ok(took));
                    run_subscriber(conn, i as u32, stop, &dial.counters).await
                }
                Err(e) => {
                    let msg = format!("subscriber {}: {e:#}", i + 1);
                    ready.report(Err(msg.clone()));
                    SubOutcome {
                        error: Some(msg),
                        ..SubOutcome::default()
                    }
                }
            }
        }));
    }
    let mut pubs: Vec<JoinHandle<PubOutcome>> = Vec::new();
    for (i, template) in templates.into_iter().enumerate() {
        let (dial, ready, mut start, stop, load) = (
            dial.clone(),
            tally.entry(),
            start_rx.clone(),
            stop_rx.clone(),
            load.clone(),
        );
        let k = (plan.subscribers.len() + i) as u64;
        pubs.push(tokio::spawn(async move {
            let conn = match dial.connect(k, "pub", i as u32 + 1).await {
                Ok((conn, took)) => {
                    ready.report(Ok(took));
                    conn
                }
                Err(e) => {
                    let msg = format!("publisher {}: {e:#}", i + 1);
                    ready.report(Err(msg.clone()));
                    return PubOutcome {
                        error: Some(msg),
                        ..PubOutcome::default()
                    };
                }
            };
            let began = match start.wait_for(Option::is_some).await {
                Ok(v) => *v,
                Err(_) => None,
            };
            match began {
                Some(began) if !*stop.borrow() => {
                    run_publisher(conn, i as u32, template, load, began, &dial.counters).await
                }
                _ => {
                    conn.disconnect().await;
                    PubOutcome::default()
                }
            }
        }));
    }
    let mut ready = tally.wait().await;
    let connected_at = Instant::now();
    let broker_from = broker.and_then(Proc::sample);
    let self_from = Proc::Current.sample();
    let start = Instant::now();
    if !ready.errors.is_empty() {
        // Without every client the counts mean nothing: stop everyone and report the failure.
        let _ = stop_tx.send(true);
    }
    let _ = start_tx.send(Some(start));

    let mut pub_results = Vec::with_capacity(pubs.len());
    for h in pubs {
        pub_results.push(h.await.unwrap_or_else(|e| PubOutcome {
            error: Some(format!("publisher task failed: {e}")),
            ..PubOutcome::default()
        }));
    }
    let sent: Vec<u64> = pub_results.iter().map(|p| p.sent).collect();

    // Deliveries still under way: wait until every expected one arrived, or nothing arrived for
    // `drain_idle` (a second by default), or the drain time is over. `sub` alone listens for its duration or count.
    let all_known = plan.subscribers.iter().all(|s| s.expects.is_some());
    let expected: Option<u64> = all_known.then(|| {
        plan.subscribers
            .iter()
            .flat_map(|s| s.expects.iter().flatten())
            .map(|&p| sent.get(p as usize).copied().unwrap_or(0))
            .sum()
    });
    if ready.errors.is_empty() && !plan.subscribers.is_empty() {
        if plan.publishers.is_empty() {
            let until = start + load.duration;
            while Instant::now() < until
                && plan
                    .receive_count
                    .is_none_or(|c| dial.counters.received.load(Relaxed) < c)
            {
                sleep(Duration::from_millis(10)).await;
            }
        } else {
            let until = Instant::now() + load.drain;
            let mut last = dial.counters.received.load(Relaxed);
            let mut last_change = Instant::now();
            loop {
                let now = Instant::now();
                let got = dial.counters.received.load(Relaxed);
                if got != last {
                    (last, last_change) = (got, now);
                }
                let complete = expected.is_some_and(|e| got >= e);
                if complete || now >= until || now >= last_change + load.drain_idle {
                    break;
                }
                sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let broker_to = broker.and_then(Proc::sample);
    let self_to = Proc::Current.sample();
    let _ = stop_tx.send(true);
    let mut sub_results = Vec::with_capacity(subs.len());
    for h in subs {
        sub_results.push(h.await.unwrap_or_else(|e| SubOutcome {
            error: Some(format!("subscriber task failed: {e}")),
            ..SubOutcome::default()
        }));
    }

    let mut total = Receipts::new();
    let mut lost = 0u64;
    let mut unique = 0u64;
    for (spec, out) in plan.subscribers.iter().zip(&sub_results) {
        total.merge_counts(&out.receipts);
        unique += out.receipts.unique();
        lost += match &spec.expects {
            Some(from) => out.receipts.lost(from, &sent),
            None => out.receipts.gaps(),
        };
    }
    let mut errors: Vec<String> = std::mem::take(&mut ready.errors);
    for e in pub_results.iter().filter_map(|p| p.error.clone()) {
        if !errors.contains(&e) {
            errors.push(e);
        }
    }
    for e in sub_results.iter().filter_map(|s| s.error.clone()) {
        if !errors.contains(&e) {
            errors.push(e);
        }
    }
    let last_send = pub_results.iter().filter_map(|p| p.last_send).max();
    let last_recv = sub_results.iter().filter_map(|s| s.last_recv).max();
    let secs_since = |t: Option<Instant>| t.map_or(0.0, |t| t.duration_since(start).as_secs_f64());
    let pub_secs = secs_since(last_send);
    let recv_secs = secs_since(last_recv);
    let sent_total: u64 = sent.iter().sum();
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let connect_secs = connected_at.duration_since(connect_began).as_secs_f64();

    Ok(Summary {
        publishers: plan.publishers.len(),
        subscribers: plan.subscribers.len(),
        payload_bytes: load.size,
        rate_per_publisher: load.rate,
        duration_secs: pub_secs,
        connected: ready.ok,
        connect_failures: (n_clients as u64).saturating_sub(ready.ok),
        connect_rate: rate(ready.ok, connect_secs),
        connect_latency_us: ready.latency(),
        sent: sent_total,
        acked: pub_results.iter().map(|p| p.acked).sum(),
        rejected: pub_results.iter().map(|p| p.rejected).sum(),
        expected,
        received: total.received,
        unique,
        lost,
        duplicates: total.duplicates,
        foreign: total.foreign,
        sent_rate: rate(sent_total, pub_secs),
        recv_rate: rate(total.received, recv_secs),
        latency_us: Percentiles::of(&total.latency_us),
        broker: usage(broker, broker_from, broker_to),
        bench_cpu_pct: bench_cpu(self_from, self_to),
        errors: errors.len() as u64,
        first_error: errors.into_iter().next(),
        ..Summary::default()
    })
}

async fn run_idle<T: Transport>(
    dial: Dial<T>,
    plan: &Plan,
    clients: u32,
    broker: Option<Proc>,
) -> Result<Summary> {
    let broker_before = broker.and_then(Proc::sample);
    let self_from = Proc::Current.sample();
    let broker_cpu_from = broker.and_then(cpu_secs_precise);
    let self_cpu_from = cpu_secs_precise(Proc::Current);
    let tally = Tally::new(clients as usize);
    let (stop_tx, stop_rx) = watch::channel(false);
    let began = Instant::now();
    let mut tasks: Vec<JoinHandle<Option<String>>> = Vec::with_capacity(clients as usize);
    for i in 0..clients {
        let (dial, ready, stop) = (dial.clone(), tally.entry(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            match dial.connect(u64::from(i), "conn", i + 1).await {
                Ok((conn, took)) => {
                    ready.report(Ok(took));
                    hold_idle(conn, stop).await
                }
                Err(e) => {
                    let msg = format!("client {}: {e:#}", i + 1);
                    ready.report(Err(msg.clone()));
                    Some(msg)
                }
            }
        }));
    }
    let mut ready = tally.wait().await;
    let connect_secs = began.elapsed().as_secs_f64();
    let broker_cpu_to = broker.and_then(cpu_secs_precise);
    let self_cpu_to = cpu_secs_precise(Proc::Current);
    let per_connect = |from: Option<f64>, to: Option<f64>| match (from, to) {
        (Some(a), Some(b)) if ready.ok > 0 => Some((b - a).max(0.0) * 1e6 / ready.ok as f64),
        _ => None,
    };
    let broker_cpu_us_per_connect = per_connect(broker_cpu_from, broker_cpu_to);
    let bench_cpu_us_per_connect = per_connect(self_cpu_from, self_cpu_to);
    // Let the broker settle before reading its memory, then hold for the rest of the duration.
    let hold = plan.load.duration;
    let settle = hold.min(Duration::from_secs(1));
    sleep(settle).await;
    let broker_held = broker.and_then(Proc::sample);
    sleep(hold - settle).await;
    let self_to = Proc::Current.sample();
    let _ = stop_tx.send(true);
    let mut errors = std::mem::take(&mut ready.errors);
    for t in tasks {
        if let Ok(Some(e)) = t.await
            && !errors.contains(&e)
        {
            errors.push(e);
        }
    }
    let mut usage = usage(broker, broker_before, broker_held);
    if let (Some(u), true) = (usage.as_mut(), ready.ok > 0) {
        let grown = u.rss_end_kib.saturating_sub(u.rss_start_kib) as f64 * 1024.0;
        u.rss_per_conn_bytes = Some(grown / ready.ok as f64);
    }
    Ok(Summary {
        duration_secs: hold.as_secs_f64(),
        connected: ready.ok,
        connect_failures: u64::from(clients).saturating_sub(ready.ok),
        connect_rate: if connect_secs > 0.0 {
            ready.ok as f64 / connect_secs
        } else {
            0.0
        },
        connect_latency_us: ready.latency(),
        broker_cpu_us_per_connect,
        bench_cpu_us_per_connect,
        broker: usage,
        bench_cpu_pct: bench_cpu(self_from, self_to),
        errors: errors.len() as u64,
        first_error: errors.into_iter().next(),
        ..Summary::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client's result is counted once, failures keep their message, and a client
    /// whose task ends without reporting counts as a failure instead of leaving the wait hung.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tally_counts_every_client_once_and_wakes_after_the_last() {
        let tally = Tally::new(50);
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let entry = tally.entry();
            tasks.push(tokio::spawn(async move {
                match i {
                    7 => entry.report(Err("client 8: refused".into())),
                    9 => drop(entry),
                    _ => entry.report(Ok(Duration::from_micros(100 + i))),
                }
            }));
        }
        let ready = tokio::time::timeout(Duration::from_secs(10), tally.wait())
            .await
            .expect("every client reported in time");
        assert_eq!(ready.ok, 48);
        assert_eq!(ready.errors.len(), 2);
        assert!(ready.errors.iter().any(|e| e == "client 8: refused"));
        assert!(
            ready
                .errors
                .iter()
                .any(|e| e.contains("ended before it connected"))
        );
        assert_eq!(ready.latency().count, 48);
        for t in tasks {
            t.await.expect("task");
        }
    }

    #[tokio::test]
    async fn a_tally_of_no_clients_is_ready_at_once() {
        let ready = tokio::time::timeout(Duration::from_secs(10), Tally::new(0).wait())
            .await
            .expect("ready at once");
        assert_eq!((ready.ok, ready.errors.len()), (0, 0));
    }
}
