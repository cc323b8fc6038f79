//! Packet protection throughput of mqttd-tls's backend (OpenSSL 3.5 EVP through ngtcp2's crypto
//! API) against `ring` (the AEAD of quinn's default stack), on the same inputs in the same run:
//! seal + open of 1,200-byte packets per cipher suite, and the header protection mask.
//!
//! `cargo bench -p mqttd-tls --bench aead -- --warm-up-time 1 --measurement-time 3`
//!
//! After criterion's groups, a paired summary alternates the two implementations in short blocks
//! and keeps each one's best block, which is robust against a busy machine; it prints the
//! throughput ratio ours/ring per suite (> 1.0 means we are faster).

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use mqttd_ngtcp2_sys::*;
use mqttd_tls::CipherSuite;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, quic};

// Backend functions that bindgen did not see (declared in ngtcp2's `crypto/shared.h`).
unsafe extern "C" {
    fn ngtcp2_crypto_cipher_ctx_encrypt_init(
        cipher_ctx: *mut ngtcp2_crypto_cipher_ctx,
        cipher: *const ngtcp2_crypto_cipher,
        key: *const u8,
    ) -> std::ffi::c_int;
    fn ngtcp2_crypto_cipher_ctx_free(cipher_ctx: *mut ngtcp2_crypto_cipher_ctx);
}

const PACKET: usize = 1200;
const TAG: usize = 16;
const HEADER: [u8; 21] = [
    0x41, 0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
    0x88, 0x99, 0xaa, 0x00, 0x01,
];
const IV: [u8; 12] = [0x5a; 12];

fn nonce_for(pn: u64) -> [u8; 12] {
    let mut n = IV;
    for (b, p) in n[4..].iter_mut().zip(pn.to_be_bytes()) {
        *b ^= p;
    }
    n
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

struct Suite {
    suite: CipherSuite,
    name: &'static str,
    key_len: usize,
    ring_aead: &'static aead::Algorithm,
    ring_hp: &'static quic::Algorithm,
}

const SUITES: [Suite; 3] = [
    Suite {
        suite: CipherSuite::Aes128GcmSha256,
        name: "AES-128-GCM",
        key_len: 16,
        ring_aead: &aead::AES_128_GCM,
        ring_hp: &quic::AES_128,
    },
    Suite {
        suite: CipherSuite::Aes256GcmSha384,
        name: "AES-256-GCM",
        key_len: 32,
        ring_aead: &aead::AES_256_GCM,
        ring_hp: &quic::AES_256,
    },
    Suite {
        suite: CipherSuite::Chacha20Poly1305Sha256,
        name: "ChaCha20-Poly1305",
        key_len: 32,
        ring_aead: &aead::CHACHA20_POLY1305,
        ring_hp: &quic::CHACHA20,
    },
];

impl Suite {
    fn key(&self) -> Vec<u8> {
        (0..self.key_len as u8)
            .map(|i| i.wrapping_mul(29))
            .collect()
    }
}

/// Our backend: AEAD contexts keyed once (as ngtcp2 keeps them per key), a fresh nonce per packet.
struct Ours {
    ctx: ngtcp2_crypto_ctx,
    enc: ngtcp2_crypto_aead_ctx,
    dec: ngtcp2_crypto_aead_ctx,
    hp: ngtcp2_crypto_cipher_ctx,
    payload: Vec<u8>,
    sealed: Vec<u8>,
    opened: Vec<u8>,
    pn: u64,
}

impl Ours {
    fn new(s: &Suite) -> Self {
        Self::with_len(s, PACKET)
    }

    fn with_len(s: &Suite, len: usize) -> Self {
        let ctx = mqttd_tls::crypto_ctx(s.suite);
        let key = s.key();
        let mut o = Ours {
            ctx,
            enc: ngtcp2_crypto_aead_ctx::default(),
            dec: ngtcp2_crypto_aead_ctx::default(),
            hp: ngtcp2_crypto_cipher_ctx::default(),
            payload: payload(len),
            sealed: vec![0; len + TAG],
            opened: vec![0; len],
            pn: 0,
        };
        // SAFETY: keys have the suite's key lengths; the contexts are writable.
        unsafe {
            assert_eq!(
                ngtcp2_crypto_aead_ctx_encrypt_init(&mut o.enc, &o.ctx.aead, key.as_ptr(), 12),
                0
            );
            assert_eq!(
                ngtcp2_crypto_aead_ctx_decrypt_init(&mut o.dec, &o.ctx.aead, key.as_ptr(), 12),
                0
            );
            assert_eq!(
                ngtcp2_crypto_cipher_ctx_encrypt_init(&mut o.hp, &o.ctx.hp, key.as_ptr()),
                0
            );
        }
        o
    }

    fn seal(&mut self, pn: u64) -> &[u8] {
        let n = nonce_for(pn);
        // SAFETY: sealed has room for payload + tag; the context was keyed in new().
        let rv = unsafe {
            ngtcp2_crypto_encrypt(
                self.sealed.as_mut_ptr(),
                &self.ctx.aead,
                &self.enc,
                self.payload.as_ptr(),
                self.payload.len(),
                n.as_ptr(),
                12,
                HEADER.as_ptr(),
                HEADER.len(),
            )
        };
        assert_eq!(rv, 0);
        &self.sealed
    }

    fn seal_open(&mut self) {
        self.pn += 1;
        let pn = self.pn;
        self.seal(pn);
        let n = nonce_for(pn);
        // SAFETY: opened has room for the payload; the context was keyed in new().
        let rv = unsafe {
            ngtcp2_crypto_decrypt(
                self.opened.as_mut_ptr(),
                &self.ctx.aead,
                &self.dec,
                self.sealed.as_ptr(),
                self.sealed.len(),
                n.as_ptr(),
                12,
                HEADER.as_ptr(),
                HEADER.len(),
            )
        };
        assert_eq!(rv, 0);
        black_box(&self.opened);
    }

    fn mask(&mut self, sample: &[u8; 16]) -> [u8; 5] {
        let mut mask = [0u8; 16];
        // SAFETY: 16-byte sample, mask has room for NGTCP2_HP_MASKLEN; hp keyed in new().
        let rv = unsafe {
            ngtcp2_crypto_hp_mask(mask.as_mut_ptr(), &self.ctx.hp, &self.hp, sample.as_ptr())
        };
        assert_eq!(rv, 0);
        mask[..5].try_into().unwrap()
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        // SAFETY: made by the inits in new(), freed once.
        unsafe {
            ngtcp2_crypto_aead_ctx_free(&mut self.enc);
            ngtcp2_crypto_aead_ctx_free(&mut self.dec);
            ngtcp2_crypto_cipher_ctx_free(&mut self.hp);
        }
    }
}

/// ring doing the same work: copy the payload in, seal in place, open in place.
struct Ring {
    key: LessSafeKey,
    hp: quic::HeaderProtectionKey,
    payload: Vec<u8>,
    buf: Vec<u8>,
    pn: u64,
}

impl Ring {
    fn new(s: &Suite) -> Self {
        Self::with_len(s, PACKET)
    }

    fn with_len(s: &Suite, len: usize) -> Self {
        let key = s.key();
        Ring {
            key: LessSafeKey::new(UnboundKey::new(s.ring_aead, &key).unwrap()),
            hp: quic::HeaderProtectionKey::new(s.ring_hp, &key).unwrap(),
            payload: payload(len),
            buf: vec![0; len + TAG],
            pn: 0,
        }
    }

    fn seal(&mut self, pn: u64) -> &[u8] {
        let len = self.payload.len();
        self.buf[..len].copy_from_slice(&self.payload);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce_for(pn)),
                Aad::from(&HEADER[..]),
                &mut self.buf[..len],
            )
            .unwrap();
        self.buf[len..].copy_from_slice(tag.as_ref());
        &self.buf
    }

    fn seal_open(&mut self) {
        self.pn += 1;
        let pn = self.pn;
        self.seal(pn);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_for(pn)),
                Aad::from(&HEADER[..]),
                &mut self.buf,
            )
            .unwrap();
        black_box(plain);
    }

    fn mask(&self, sample: &[u8; 16]) -> [u8; 5] {
        self.hp.new_mask(sample).unwrap()
    }
}

/// Both implementations produce the same bytes for the same inputs.
fn cross_check(s: &Suite) {
    let (mut ours, mut ring) = (Ours::new(s), Ring::new(s));
    for pn in [1, 2, 0x1234_5678] {
        assert_eq!(
            ours.seal(pn),
            ring.seal(pn),
            "{}: sealed packets differ",
            s.name
        );
    }
    ours.seal_open();
    assert_eq!(ours.opened, ours.payload, "{}: round trip", s.name);
    for i in 0..4u8 {
        let sample = [i.wrapping_mul(77); 16];
        assert_eq!(ours.mask(&sample), ring.mask(&sample), "{}: HP", s.name);
    }
}

fn sample_for(counter: u64) -> [u8; 16] {
    let mut sample = [0x33u8; 16];
    sample[..8].copy_from_slice(&counter.to_le_bytes());
    sample
}

fn bench_seal_open(c: &mut Criterion) {
    for s in &SUITES {
        cross_check(s);
        // 1,200 bytes: a full-size QUIC packet; 32 bytes: the fixed per-packet cost (ACKs).
        for len in [PACKET, 32] {
            let mut group = c.benchmark_group(format!("seal_open_{len}/{}", s.name));
            group.throughput(Throughput::Bytes(len as u64));
            let mut ours = Ours::with_len(s, len);
            group.bench_function("ngtcp2+openssl", |b| b.iter(|| ours.seal_open()));
            let mut ring = Ring::with_len(s, len);
            group.bench_function("ring", |b| b.iter(|| ring.seal_open()));
            group.finish();
        }
    }
}

fn bench_hp(c: &mut Criterion) {
    for s in &SUITES {
        let mut group = c.benchmark_group(format!("hp_mask/{}", s.name));
        group.throughput(Throughput::Elements(1));
        let mut ours = Ours::new(s);
        let mut counter = 0u64;
        group.bench_function("ngtcp2+openssl", |b| {
            b.iter(|| {
                counter += 1;
                black_box(ours.mask(&sample_for(counter)));
            })
        });
        let ring = Ring::new(s);
        let mut counter = 0u64;
        group.bench_function("ring", |b| {
            b.iter(|| {
                counter += 1;
                black_box(ring.mask(&sample_for(counter)));
            })
        });
        group.finish();
    }
}

/// Best time per call over `rounds` alternating blocks of `block` calls each: (a, b) in ns.
fn paired(rounds: u32, block: u32, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let (mut best_a, mut best_b) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..block {
            a();
        }
        best_a = best_a.min(t.elapsed().as_nanos() as f64 / block as f64);
        let t = Instant::now();
        for _ in 0..block {
            b();
        }
        best_b = best_b.min(t.elapsed().as_nanos() as f64 / block as f64);
    }
    (best_a, best_b)
}

fn summary() {
    eprintln!("\npaired summary (best of 100 alternating blocks; ratio = ring time / our time):");
    for s in &SUITES {
        let (mut ours, mut ring) = (Ours::new(s), Ring::new(s));
        let (o, r) = paired(100, 500, || ours.seal_open(), || ring.seal_open());
        eprintln!(
            "  seal+open 1200 B {:<18} ours {:>7.0} ns  ring {:>7.0} ns  ours/ring throughput {:.2}x",
            s.name,
            o,
            r,
            r / o
        );
        // The fixed per-packet cost: the same with a 32-byte payload.
        let (mut ours, mut ring) = (Ours::with_len(s, 32), Ring::with_len(s, 32));
        let (o, r) = paired(100, 2000, || ours.seal_open(), || ring.seal_open());
        eprintln!(
            "  seal+open   32 B {:<18} ours {:>7.0} ns  ring {:>7.0} ns  ours/ring throughput {:.2}x",
            s.name,
            o,
            r,
            r / o
        );
        let (mut ours, ring) = (Ours::new(s), Ring::new(s));
        let (mut c1, mut c2) = (0u64, 0u64);
        let (o, r) = paired(
            100,
            2000,
            || {
                c1 += 1;
                black_box(ours.mask(&sample_for(c1)));
            },
            || {
                c2 += 1;
                black_box(ring.mask(&sample_for(c2)));
            },
        );
        eprintln!(
            "  hp mask          {:<18} ours {:>7.1} ns  ring {:>7.1} ns  ours/ring throughput {:.2}x",
            s.name,
            o,
            r,
            r / o
        );
    }
}

/// `AEAD_BENCH_SIZES=32,1200,4800,9600` adds paired AES-128-GCM seal+open figures at those
/// payload sizes: the slope between two sizes is each library's per-byte cost, the 32-byte figure
/// its per-call cost. (OpenSSL's x86-64 AES-GCM has a 128-bit AVX kernel and a VAES + AVX-512
/// one, no VAES-AVX2 one; ring 0.17 has VAES-AVX2. Above ~10 KiB ring takes a slower path, which
/// QUIC packets never reach.)
fn size_sweep() {
    let Ok(list) = std::env::var("AEAD_BENCH_SIZES") else {
        return;
    };
    let s = &SUITES[0];
    for len in list
        .split(',')
        .filter_map(|v| v.trim().parse::<usize>().ok())
    {
        let (mut ours, mut ring) = (Ours::with_len(s, len), Ring::with_len(s, len));
        let block = (200_000 / (len + 200)).clamp(20, 2000) as u32;
        let (o, r) = paired(60, block, || ours.seal_open(), || ring.seal_open());
        eprintln!(
            "  seal+open {len:>6} B {:<16} ours {o:>7.0} ns  ring {r:>7.0} ns  ours/ring throughput {:.2}x",
            s.name,
            r / o
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_seal_open(&mut c);
    bench_hp(&mut c);
    c.final_summary();
    // `cargo test --benches` runs this binary in test mode: skip the timing summary there.
    // `--profile-time` (for perf) runs one benchmark only: skip it there too.
    if !std::env::args().any(|a| a == "--test" || a == "--list" || a == "--profile-time") {
        summary();
        size_sweep();
    }
}
