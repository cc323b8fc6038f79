//! Packet protection throughput of mqttd-tls's backend (OpenSSL 3.5 EVP through ngtcp2's crypto
//! API) against `ring` (the AEAD of quinn's default stack), on the same inputs in the same run:
//! seal + open of 1,200-byte packets per cipher suite, and the header protection mask.
//!
//! `cargo bench -p mqttd-tls --bench aead -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

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

fn nonce_for(iv: &[u8; 12], pn: u64) -> [u8; 12] {
    let mut n = *iv;
    for (b, p) in n[4..].iter_mut().zip(pn.to_be_bytes()) {
        *b ^= p;
    }
    n
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

fn bench_seal_open(c: &mut Criterion) {
    let header: Vec<u8> = (0..21u8).collect();
    let payload: Vec<u8> = (0..PACKET).map(|i| (i * 7 % 251) as u8).collect();
    let iv = [0x5au8; 12];
    for s in &SUITES {
        let key: Vec<u8> = (0..s.key_len as u8).map(|i| i.wrapping_mul(29)).collect();
        let mut group = c.benchmark_group(format!("seal_open_1200/{}", s.name));
        group.throughput(Throughput::Bytes(PACKET as u64));

        // Ours: contexts created once (as ngtcp2 does per key), a fresh nonce per packet.
        let ctx = mqttd_tls::crypto_ctx(s.suite);
        let mut enc = ngtcp2_crypto_aead_ctx::default();
        let mut dec = ngtcp2_crypto_aead_ctx::default();
        // SAFETY: key has the suite's key length; the contexts are writable.
        unsafe {
            assert_eq!(
                ngtcp2_crypto_aead_ctx_encrypt_init(&mut enc, &ctx.aead, key.as_ptr(), 12),
                0
            );
            assert_eq!(
                ngtcp2_crypto_aead_ctx_decrypt_init(&mut dec, &ctx.aead, key.as_ptr(), 12),
                0
            );
        }
        let mut sealed = vec![0u8; PACKET + TAG];
        let mut opened = vec![0u8; PACKET];
        let mut pn = 0u64;
        group.bench_function("ngtcp2+openssl", |b| {
            b.iter(|| {
                pn += 1;
                let n = nonce_for(&iv, pn);
                // SAFETY: buffers sized for payload + tag and payload; contexts keyed above.
                unsafe {
                    let rv = ngtcp2_crypto_encrypt(
                        sealed.as_mut_ptr(),
                        &ctx.aead,
                        &enc,
                        payload.as_ptr(),
                        PACKET,
                        n.as_ptr(),
                        12,
                        header.as_ptr(),
                        header.len(),
                    );
                    assert_eq!(rv, 0);
                    let rv = ngtcp2_crypto_decrypt(
                        opened.as_mut_ptr(),
                        &ctx.aead,
                        &dec,
                        sealed.as_ptr(),
                        PACKET + TAG,
                        n.as_ptr(),
                        12,
                        header.as_ptr(),
                        header.len(),
                    );
                    assert_eq!(rv, 0);
                }
                black_box(&opened);
            })
        });
        assert_eq!(opened, payload, "{}: round trip", s.name);
        // SAFETY: made by the inits above, freed once.
        unsafe {
            ngtcp2_crypto_aead_ctx_free(&mut enc);
            ngtcp2_crypto_aead_ctx_free(&mut dec);
        }

        // ring, the same work: copy in, seal in place, open in place.
        let rkey = LessSafeKey::new(UnboundKey::new(s.ring_aead, &key).unwrap());
        let mut buf = vec![0u8; PACKET + TAG];
        let mut pn = 0u64;
        let mut ring_sealed = Vec::new();
        group.bench_function("ring", |b| {
            b.iter(|| {
                pn += 1;
                let n = nonce_for(&iv, pn);
                buf[..PACKET].copy_from_slice(&payload);
                let tag = rkey
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&header[..]),
                        &mut buf[..PACKET],
                    )
                    .unwrap();
                buf[PACKET..].copy_from_slice(tag.as_ref());
                if pn == 1 {
                    ring_sealed = buf.clone();
                }
                let plain = rkey
                    .open_in_place(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(&header[..]),
                        &mut buf,
                    )
                    .unwrap();
                black_box(plain);
            })
        });
        // Same inputs, same output: our first sealed packet equals ring's.
        let mut first = vec![0u8; PACKET + TAG];
        let mut enc = ngtcp2_crypto_aead_ctx::default();
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                ngtcp2_crypto_aead_ctx_encrypt_init(&mut enc, &ctx.aead, key.as_ptr(), 12),
                0
            );
            let n = nonce_for(&iv, 1);
            assert_eq!(
                ngtcp2_crypto_encrypt(
                    first.as_mut_ptr(),
                    &ctx.aead,
                    &enc,
                    payload.as_ptr(),
                    PACKET,
                    n.as_ptr(),
                    12,
                    header.as_ptr(),
                    header.len(),
                ),
                0
            );
            ngtcp2_crypto_aead_ctx_free(&mut enc);
        }
        assert!(
            ring_sealed.is_empty() || ring_sealed == first,
            "{}: ring and ngtcp2 disagree",
            s.name
        );
        group.finish();
    }
}

fn bench_hp(c: &mut Criterion) {
    for s in &SUITES {
        let key: Vec<u8> = (0..s.key_len as u8).map(|i| i.wrapping_mul(13)).collect();
        let mut group = c.benchmark_group(format!("hp_mask/{}", s.name));
        group.throughput(Throughput::Elements(1));

        let ctx = mqttd_tls::crypto_ctx(s.suite);
        let mut hp = ngtcp2_crypto_cipher_ctx::default();
        // SAFETY: key has the HP cipher's key length.
        unsafe {
            assert_eq!(
                ngtcp2_crypto_cipher_ctx_encrypt_init(&mut hp, &ctx.hp, key.as_ptr()),
                0
            );
        }
        let mut sample = [0x33u8; 16];
        let mut counter = 0u64;
        let mut mask = [0u8; 16];
        group.bench_function("ngtcp2+openssl", |b| {
            b.iter(|| {
                counter += 1;
                sample[..8].copy_from_slice(&counter.to_le_bytes());
                // SAFETY: 16-byte sample, mask room for NGTCP2_HP_MASKLEN.
                let rv = unsafe {
                    ngtcp2_crypto_hp_mask(mask.as_mut_ptr(), &ctx.hp, &hp, sample.as_ptr())
                };
                assert_eq!(rv, 0);
                black_box(&mask);
            })
        });
        // Same sample, same mask.
        sample[..8].copy_from_slice(&7u64.to_le_bytes());
        // SAFETY: as above.
        unsafe { ngtcp2_crypto_hp_mask(mask.as_mut_ptr(), &ctx.hp, &hp, sample.as_ptr()) };
        let ours = mask[..5].to_vec();
        // SAFETY: made by the init above, freed once.
        unsafe { ngtcp2_crypto_cipher_ctx_free(&mut hp) };

        let rkey = quic::HeaderProtectionKey::new(s.ring_hp, &key).unwrap();
        assert_eq!(
            rkey.new_mask(&sample).unwrap()[..],
            ours[..],
            "{}: HP masks differ",
            s.name
        );
        let mut counter = 0u64;
        group.bench_function("ring", |b| {
            b.iter(|| {
                counter += 1;
                sample[..8].copy_from_slice(&counter.to_le_bytes());
                black_box(rkey.new_mask(&sample).unwrap());
            })
        });
        group.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_seal_open(&mut c);
    bench_hp(&mut c);
    c.final_summary();
}
