//! Loss and duplicate accounting from the sequence numbers in the payload, and the latency
//! histogram.
//!
//! Each subscriber owns one [`Receipts`]: a bit per (publisher, sequence number) seen, so a
//! second copy of a message is a duplicate, and what a publisher sent but never arrived is a loss.
//! Nothing is shared between subscriber tasks while a run goes; their `Receipts` are merged into
//! one report at the end.

use hdrhistogram::Histogram;

/// Publisher indices beyond this are treated as foreign (not from this run).
pub const MAX_PUBLISHERS: u32 = 1 << 20;
/// Sequence numbers beyond this are treated as foreign: it bounds a tracker's memory.
pub const MAX_SEQ: u64 = 1 << 34;

/// Which sequence numbers of one publisher have been seen: a growable bitset.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    bits: Vec<u64>,
    unique: u64,
    /// Highest sequence number seen plus one (0 when none).
    end: u64,
}

impl SeqTracker {
    /// Records `seq`; returns false if it had been seen already (a duplicate).
    pub fn record(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << (seq % 64);
        if self.bits[word] & mask != 0 {
            return false;
        }
        self.bits[word] |= mask;
        self.unique += 1;
        self.end = self.end.max(seq + 1);
        true
    }

    /// Distinct sequence numbers seen.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Sequence numbers below the highest one seen that never arrived.
    pub fn gaps(&self) -> u64 {
        self.end - self.unique
    }
}

/// What one subscriber (or, merged, all of them) received.
#[derive(Debug, Clone)]
pub struct Receipts {
    trackers: Vec<SeqTracker>,
    /// Benchmark messages received, duplicates included.
    pub received: u64,
    /// Copies of a message already received.
    pub duplicates: u64,
    /// Messages without a benchmark header, or with an impossible publisher or sequence.
    pub foreign: u64,
    /// End-to-end latency in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Default for Receipts {
    fn default() -> Self {
        Self::new()
    }
}

impl Receipts {
    /// Empty receipts; the histogram covers 1 µs to 1 hour at 3 significant digits.
    pub fn new() -> Self {
        Self {
            trackers: Vec::new(),
            received: 0,
            duplicates: 0,
            foreign: 0,
            latency_us: new_histogram(),
        }
    }

    /// Records one message from `publisher` with sequence `seq`, sent at `sent_ns` and received
    /// at `now_ns` (both nanoseconds on the same clock).
    pub fn record(&mut self, publisher: u32, seq: u64, sent_ns: u64, now_ns: u64) {
        if publisher >= MAX_PUBLISHERS || seq >= MAX_SEQ {
            self.foreign += 1;
            return;
        }
        self.received += 1;
        let p = publisher as usize;
        if p >= self.trackers.len() {
            self.trackers.resize_with(p + 1, SeqTracker::default);
        }
        if !self.trackers[p].record(seq) {
            self.duplicates += 1;
        }
        let us = now_ns.saturating_sub(sent_ns) / 1_000;
        self.latency_us.saturating_record(us.max(1));
    }

    /// Distinct messages received from `publisher`.
    pub fn unique_from(&self, publisher: u32) -> u64 {
        self.trackers
            .get(publisher as usize)
            .map_or(0, SeqTracker::unique)
    }

    /// Distinct messages received, over all publishers.
    pub fn unique(&self) -> u64 {
        self.trackers.iter().map(SeqTracker::unique).sum()
    }

    /// Messages missing below each publisher's highest sequence number seen: the loss a
    /// subscriber can see without knowing what was sent.
    pub fn gaps(&self) -> u64 {
        self.trackers.iter().map(SeqTracker::gaps).sum()
    }

    /// Messages lost: for each publisher this subscriber should have heard, what it sent minus
    /// what arrived (`sent[i]` is publisher `i`'s count).
    pub fn lost(&self, expected_publishers: &[u32], sent: &[u64]) -> u64 {
        expected_publishers
            .iter()
            .map(|&p| {
                let sent = sent.get(p as usize).copied().unwrap_or(0);
                sent.saturating_sub(self.unique_from(p))
            })
            .sum()
    }

    /// Adds the counts and latencies of `other` (another subscriber); trackers are not merged,
    /// since two subscribers each receiving a message once is not a duplicate.
    pub fn merge_counts(&mut self, other: &Receipts) {
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.foreign += other.foreign;
        // Both histograms have the same range, so adding cannot fail; keep going if it does.
        let _ = self.latency_us.add(&other.latency_us);
    }
}

/// A histogram for microsecond latencies from 1 µs to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds")
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// 50th percentile.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_duplicates_and_gaps() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 2, 5, 5, 3, 200, 0] {
            t.record(seq);
        }
        assert_eq!(t.unique(), 6);
        // 0..=200 is 201 numbers, 6 seen.
        assert_eq!(t.gaps(), 195);
    }

    #[test]
    fn receipts_known_sequence() {
        let mut r = Receipts::new();
        // Publisher 0 sent 0..10 and we lose 3 and 7 and see 4 twice; publisher 2 sent 0..5 and
        // everything arrives out of order; publisher 1 is not expected here.
        for seq in (0..10).filter(|s| *s != 3 && *s != 7) {
            r.record(0, seq, 1_000_000, 3_000_000);
        }
        r.record(0, 4, 1_000_000, 3_000_000);
        for seq in [4, 3, 2, 1, 0] {
            r.record(2, seq, 1_000_000, 2_000_000);
        }
        r.record(MAX_PUBLISHERS, 0, 0, 0);
        let sent = [10, 99, 5];
        assert_eq!(r.received, 8 + 1 + 5);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.foreign, 1);
        assert_eq!(r.unique(), 13);
        assert_eq!(r.lost(&[0, 2], &sent), 2);
        // A tail loss is invisible as a gap but counted as lost.
        assert_eq!(r.gaps(), 2);
        assert_eq!(r.lost(&[0, 1, 2], &sent), 2 + 99);
        let p = Percentiles::of(&r.latency_us);
        assert_eq!(p.count, 14);
        assert!((1995..=2005).contains(&p.max), "max {}", p.max);
        assert!((995..=1005).contains(&p.p50) || (1995..=2005).contains(&p.p50));
    }

    #[test]
    fn percentiles_of_known_distribution() {
        let mut h = new_histogram();
        for us in 1..=10_000u64 {
            h.record(us).expect("in range");
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 10_000);
        let near = |got: u64, want: u64| got.abs_diff(want) <= want / 500 + 1;
        assert!(near(p.p50, 5_000), "p50 {}", p.p50);
        assert!(near(p.p90, 9_000), "p90 {}", p.p90);
        assert!(near(p.p99, 9_900), "p99 {}", p.p99);
        assert!(near(p.p999, 9_990), "p999 {}", p.p999);
        assert!(near(p.max, 10_000), "max {}", p.max);
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn merge_adds_counts_not_duplicates() {
        let mut a = Receipts::new();
        let mut b = Receipts::new();
        a.record(0, 0, 0, 5_000);
        b.record(0, 0, 0, 7_000);
        a.merge_counts(&b);
        assert_eq!(a.received, 2);
        assert_eq!(a.duplicates, 0);
        assert_eq!(a.latency_us.len(), 2);
    }
}
