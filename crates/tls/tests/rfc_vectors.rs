//! RFC 9001 Appendix A and RFC 9369 Appendix A (QUIC v2) sample packet protection, computed
//! through mqttd-tls's backend (HKDF, AEAD, header protection) and ngtcp2's `crypto/shared.c`
//! helpers, compared byte for byte with the RFC texts.

use std::ffi::c_int;
use std::mem::MaybeUninit;

use mqttd_ngtcp2_sys::*;
use mqttd_tls::CipherSuite;

mod support;

// Helpers of ngtcp2's `crypto/shared.c` (declared in `crypto/shared.h` only) and backend functions
// of mqttd-tls that bindgen did not see; all are linked into mqttd-tls.
unsafe extern "C" {
    fn ngtcp2_crypto_ctx_initial(ctx: *mut ngtcp2_crypto_ctx) -> *mut ngtcp2_crypto_ctx;
    fn ngtcp2_crypto_aead_retry(aead: *mut ngtcp2_crypto_aead) -> *mut ngtcp2_crypto_aead;
    fn ngtcp2_crypto_derive_initial_secrets(
        rx_secret: *mut u8,
        tx_secret: *mut u8,
        initial_secret: *mut u8,
        version: u32,
        client_dcid: *const ngtcp2_cid,
        side: c_int,
    ) -> c_int;
    fn ngtcp2_crypto_derive_packet_protection_key(
        key: *mut u8,
        iv: *mut u8,
        hp: *mut u8,
        version: u32,
        aead: *const ngtcp2_crypto_aead,
        md: *const ngtcp2_crypto_md,
        secret: *const u8,
        secretlen: usize,
    ) -> c_int;
    fn ngtcp2_crypto_update_traffic_secret(
        dest: *mut u8,
        version: u32,
        md: *const ngtcp2_crypto_md,
        secret: *const u8,
        secretlen: usize,
    ) -> c_int;
    fn ngtcp2_crypto_cipher_ctx_encrypt_init(
        cipher_ctx: *mut ngtcp2_crypto_cipher_ctx,
        cipher: *const ngtcp2_crypto_cipher,
        key: *const u8,
    ) -> c_int;
    fn ngtcp2_crypto_cipher_ctx_free(cipher_ctx: *mut ngtcp2_crypto_cipher_ctx);
}

/// `NGTCP2_CRYPTO_SIDE_CLIENT` / `_SERVER` of `shared.h`.
const SIDE_CLIENT: c_int = 0;
const SIDE_SERVER: c_int = 1;

// ---- RFC 9001 Appendix A (QUIC v1) ----

const DCID: &str = "8394c8f03e515708";

const V1_INITIAL_SECRET: &str = "7db5df06e7a69e432496adedb00851923595221596ae2ae9fb8115c1e9ed0a44";
const V1_CLIENT_SECRET: &str = "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea";
const V1_CLIENT_KEY: &str = "1f369613dd76d5467730efcbe3b1a22d";
const V1_CLIENT_IV: &str = "fa044b2f42a3fd3b46fb255c";
const V1_CLIENT_HP: &str = "9f50449e04a0e810283a1e9933adedd2";
const V1_SERVER_SECRET: &str = "3c199828fd139efd216c155ad844cc81fb82fa8d7446fa7d78be803acdda951b";
const V1_SERVER_KEY: &str = "cf3a5331653c364c88f0f379b6067e37";
const V1_SERVER_IV: &str = "0ac1493ca1905853b0bba03e";
const V1_SERVER_HP: &str = "c206b8d9b9f0f37644430b490eeaa314";

/// A.2: the client's CRYPTO frame (the ClientHello); PADDING extends the payload to 1162 bytes.
const CLIENT_CRYPTO_FRAME: &str = concat!(
    "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868",
    "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578",
    "616d706c652e636f6dff01000100000a00080006001d00170018001000070005",
    "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba",
    "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400",
    "0d0010000e0403050306030203080408050806002d00020101001c0002400100",
    "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000",
    "75300901100f088394c8f03e51570806048000ffff",
);
const CLIENT_PAYLOAD_LEN: usize = 1162;

const V1_A2_HEADER: &str = "c300000001088394c8f03e5157080000449e00000002";
const V1_A2_SAMPLE: &str = "d1b1c98dd7689fb8ec11d242b123dc9b";
const V1_A2_MASK: &str = "437b9aec36";
const V1_A2_PACKET: &str = concat!(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11",
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399",
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c",
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212",
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5",
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208",
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec",
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3",
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db",
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c",
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8",
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556",
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74",
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a",
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00",
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632",
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964",
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd",
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff",
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198",
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd",
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73",
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f",
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e",
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade",
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047",
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2",
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4",
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0",
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e",
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0",
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400",
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab",
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9",
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4",
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064",
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241",
    "e221af44860018ab0856972e194cd934",
);

/// A.3: the server's payload (ACK + CRYPTO with the ServerHello), no padding.
const SERVER_PAYLOAD: &str = concat!(
    "02000000000600405a020000560303eefce7f7b37ba1d1632e96677825ddf739",
    "88cfc79825df566dc5430b9a045a1200130100002e00330024001d00209d3c94",
    "0d89690b84d08a60993c144eca684d1081287c834d5311bcf32bb9da1a002b00",
    "020304",
);
const V1_A3_HEADER: &str = "c1000000010008f067a5502a4262b50040750001";
const V1_A3_SAMPLE: &str = "2cd0991cd25b0aac406a5816b6394100";
const V1_A3_MASK: &str = "2ec0d8356a";
const V1_A3_PACKET: &str = concat!(
    "cf000000010008f067a5502a4262b5004075c0d95a482cd0991cd25b0aac406a",
    "5816b6394100f37a1c69797554780bb38cc5a99f5ede4cf73c3ec2493a1839b3",
    "dbcba3f6ea46c5b7684df3548e7ddeb9c3bf9c73cc3f3bded74b562bfb19fb84",
    "022f8ef4cdd93795d77d06edbb7aaf2f58891850abbdca3d20398c276456cbc4",
    "2158407dd074ee",
);

/// A.4: the Retry answering A.2 (new SCID f067a5502a4262b5, token "token"), tag last.
const V1_A4_RETRY: &str =
    "ff000000010008f067a5502a4262b5746f6b656e04a265ba2eff4d829058fb3f0f2496ba";
const RETRY_SCID: &str = "f067a5502a4262b5";
const RETRY_TOKEN: &[u8] = b"token";

/// A.5: ChaCha20-Poly1305 short header packet (the secret is a 1-RTT secret).
const A5_SECRET: &str = "9ac312a7f877468ebe69422748ad00a15443f18203a07d6060f688f30f21632b";
const A5_PN: u64 = 654_360_564;
const A5_HEADER: &str = "4200bff4";
const V1_A5_KEY: &str = "c6d98ff3441c3fe1b2182094f69caa2ed4b716b65488960a7a984979fb23e1c8";
const V1_A5_IV: &str = "e0459b3474bdd0e44a41c144";
const V1_A5_HP: &str = "25a282b9e82f06f21f488917a4fc8f1b73573685608597d0efcb076b0ab7a7a4";
const V1_A5_KU: &str = "1223504755036d556342ee9361d253421a826c9ecdf3c7148684b36b714881f9";
const V1_A5_NONCE: &str = "e0459b3474bdd0e46d417eb0";
const V1_A5_SAMPLE: &str = "5e5cd55c41f69080575d7999c25a5bfb";
const V1_A5_MASK: &str = "aefefe7d03";
const V1_A5_PACKET: &str = "4cfe4189655e5cd55c41f69080575d7999c25a5bfb";

// ---- RFC 9369 Appendix A (QUIC v2), same DCID ----

const V2_INITIAL_SECRET: &str = "2062e8b3cd8d52092614b8071d0aa1fb7c2e3ac193f78b280e72d8f5751f6aba";
const V2_CLIENT_SECRET: &str = "14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b";
const V2_CLIENT_KEY: &str = "8b1a0bc121284290a29e0971b5cd045d";
const V2_CLIENT_IV: &str = "91f73e2351d8fa91660e909f";
const V2_CLIENT_HP: &str = "45b95e15235d6f45a6b19cbcb0294ba9";
const V2_SERVER_SECRET: &str = "0263db1782731bf4588e7e4d93b7463907cb8cd8200b5da55a8bd488eafc37c1";
const V2_SERVER_KEY: &str = "82db637861d55e1d011f19ea71d5d2a7";
const V2_SERVER_IV: &str = "dd13c276499c0249d3310652";
const V2_SERVER_HP: &str = "edf6d05c83121201b436e16877593c3a";

const V2_A2_HEADER: &str = "d36b3343cf088394c8f03e5157080000449e00000002";
const V2_A2_SAMPLE: &str = "ffe67b6abcdb4298b485dd04de806071";
const V2_A2_MASK: &str = "94a0c95e80";
const V2_A2_PACKET: &str = concat!(
    "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485",
    "dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04",
    "9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d",
    "250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a",
    "12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500",
    "cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68",
    "18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33",
    "12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3",
    "d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd",
    "6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520",
    "bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045",
    "636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f",
    "ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12",
    "16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5",
    "4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4",
    "fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b",
    "8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7",
    "14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9",
    "9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91",
    "abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd",
    "80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db",
    "848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18",
    "d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15",
    "c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc",
    "7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61",
    "f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710",
    "10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b",
    "3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e",
    "06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce",
    "8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1",
    "34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1",
    "e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd",
    "5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3",
    "8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89",
    "d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53",
    "6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19",
    "9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b",
    "a18b2faa745b6fe189cf772a9f84cbfc",
);

const V2_A3_HEADER: &str = "d16b3343cf0008f067a5502a4262b50040750001";
const V2_A3_SAMPLE: &str = "6f05d8a4398c47089698baeea26b91eb";
const V2_A3_MASK: &str = "4dd92e91ea";
const V2_A3_PACKET: &str = concat!(
    "dc6b3343cf0008f067a5502a4262b5004075d92faaf16f05d8a4398c47089698",
    "baeea26b91eb761d9b89237bbf87263017915358230035f7fd3945d88965cf17",
    "f9af6e16886c61bfc703106fbaf3cb4cfa52382dd16a393e42757507698075b2",
    "c984c707f0a0812d8cd5a6881eaf21ceda98f4bd23f6fe1a3e2c43edd9ce7ca8",
    "4bed8521e2e140",
);

const V2_A4_RETRY: &str =
    "cf6b3343cf0008f067a5502a4262b5746f6b656ec8646ce8bfe33952d955543665dcc7b6";

const V2_A5_KEY: &str = "3bfcddd72bcf02541d7fa0dd1f5f9eeea817e09a6963a0e6c7df0f9a1bab90f2";
const V2_A5_IV: &str = "a6b5bc6ab7dafce30ffff5dd";
const V2_A5_HP: &str = "d659760d2ba434a226fd37b35c69e2da8211d10c4f12538787d65645d5d1b8e2";
const V2_A5_KU: &str = "c69374c49e3d2a9466fa689e49d476db5d0dfbc87d32ceeaa6343fd0ae4c7d88";
const V2_A5_NONCE: &str = "a6b5bc6ab7dafce328ff4a29";
const V2_A5_SAMPLE: &str = "e7b6b932bc27d786f4bc2bb20f2162ba";
const V2_A5_MASK: &str = "97580e32bf";
const V2_A5_PACKET: &str = "5558b1c60ae7b6b932bc27d786f4bc2bb20f2162ba";

// ---- helpers ----

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn cid(s: &str) -> ngtcp2_cid {
    let bytes = h(s);
    let mut c = ngtcp2_cid::default();
    c.data[..bytes.len()].copy_from_slice(&bytes);
    c.datalen = bytes.len();
    c
}

fn initial_ctx() -> ngtcp2_crypto_ctx {
    mqttd_tls::init();
    let mut ctx = ngtcp2_crypto_ctx::default();
    // SAFETY: ctx is writable; the backend fills it with static handles.
    let rv = unsafe { ngtcp2_crypto_ctx_initial(&mut ctx) };
    assert!(!rv.is_null());
    ctx
}

/// Initial secrets as `derive_initial_secrets` gives them: (initial, client, server).
fn initial_secrets(version: u32, side: c_int) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    mqttd_tls::init();
    let dcid = cid(DCID);
    let (mut rx, mut tx, mut initial) = ([0u8; 32], [0u8; 32], [0u8; 32]);
    // SAFETY: three 32-byte outputs (NGTCP2_CRYPTO_INITIAL_SECRETLEN), a live CID.
    let rv = unsafe {
        ngtcp2_crypto_derive_initial_secrets(
            rx.as_mut_ptr(),
            tx.as_mut_ptr(),
            initial.as_mut_ptr(),
            version,
            &dcid,
            side,
        )
    };
    assert_eq!(rv, 0);
    if side == SIDE_CLIENT {
        (initial.to_vec(), tx.to_vec(), rx.to_vec())
    } else {
        (initial.to_vec(), rx.to_vec(), tx.to_vec())
    }
}

/// Packet protection key, IV and header protection key of `secret` under `ctx`'s suite.
fn keys(ctx: &ngtcp2_crypto_ctx, version: u32, secret: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    // SAFETY: ctx holds this backend's handles.
    let keylen = unsafe { ngtcp2_crypto_aead_keylen(&ctx.aead) };
    // SAFETY: as above.
    let ivlen = unsafe { ngtcp2_crypto_packet_protection_ivlen(&ctx.aead) };
    let (mut key, mut iv, mut hp) = (vec![0u8; keylen], vec![0u8; ivlen], vec![0u8; keylen]);
    // SAFETY: outputs sized as the function documents; secret readable.
    let rv = unsafe {
        ngtcp2_crypto_derive_packet_protection_key(
            key.as_mut_ptr(),
            iv.as_mut_ptr(),
            hp.as_mut_ptr(),
            version,
            &ctx.aead,
            &ctx.md,
            secret.as_ptr(),
            secret.len(),
        )
    };
    assert_eq!(rv, 0);
    (key, iv, hp)
}

fn next_secret(ctx: &ngtcp2_crypto_ctx, version: u32, secret: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; secret.len()];
    // SAFETY: out has the secret's length; ctx.md is ours.
    let rv = unsafe {
        ngtcp2_crypto_update_traffic_secret(
            out.as_mut_ptr(),
            version,
            &ctx.md,
            secret.as_ptr(),
            secret.len(),
        )
    };
    assert_eq!(rv, 0);
    out
}

fn nonce(iv: &[u8], pn: u64) -> Vec<u8> {
    let mut n = iv.to_vec();
    let len = n.len();
    for (b, p) in n[len - 8..].iter_mut().zip(pn.to_be_bytes()) {
        *b ^= p;
    }
    n
}

/// An AEAD context of the backend, freed on drop.
struct AeadCtx(ngtcp2_crypto_aead_ctx);

impl AeadCtx {
    fn new(aead: &ngtcp2_crypto_aead, key: &[u8], noncelen: usize, encrypt: bool) -> Self {
        let mut ctx = ngtcp2_crypto_aead_ctx::default();
        // SAFETY: key has the AEAD's key length (callers derive it for this AEAD).
        let rv = unsafe {
            if encrypt {
                ngtcp2_crypto_aead_ctx_encrypt_init(&mut ctx, aead, key.as_ptr(), noncelen)
            } else {
                ngtcp2_crypto_aead_ctx_decrypt_init(&mut ctx, aead, key.as_ptr(), noncelen)
            }
        };
        assert_eq!(rv, 0);
        AeadCtx(ctx)
    }
}

impl Drop for AeadCtx {
    fn drop(&mut self) {
        // SAFETY: made by the backend's init, freed once.
        unsafe { ngtcp2_crypto_aead_ctx_free(&mut self.0) };
    }
}

/// A header protection context of the backend, freed on drop.
struct HpCtx(ngtcp2_crypto_cipher_ctx);

impl HpCtx {
    fn new(hp: &ngtcp2_crypto_cipher, key: &[u8]) -> Self {
        let mut ctx = ngtcp2_crypto_cipher_ctx::default();
        // SAFETY: key has the HP cipher's key length.
        let rv = unsafe { ngtcp2_crypto_cipher_ctx_encrypt_init(&mut ctx, hp, key.as_ptr()) };
        assert_eq!(rv, 0);
        HpCtx(ctx)
    }

    fn mask(&self, hp: &ngtcp2_crypto_cipher, sample: &[u8]) -> Vec<u8> {
        assert_eq!(sample.len(), NGTCP2_HP_SAMPLELEN as usize);
        let mut mask = [0u8; 32];
        // SAFETY: sample has 16 bytes, mask room for more than NGTCP2_HP_MASKLEN.
        let rv = unsafe { ngtcp2_crypto_hp_mask(mask.as_mut_ptr(), hp, &self.0, sample.as_ptr()) };
        assert_eq!(rv, 0);
        mask[..NGTCP2_HP_MASKLEN as usize].to_vec()
    }
}

impl Drop for HpCtx {
    fn drop(&mut self) {
        // SAFETY: made by the backend's init, freed once.
        unsafe { ngtcp2_crypto_cipher_ctx_free(&mut self.0) };
    }
}

/// What protecting one packet produced, for step-by-step comparison.
struct Protected {
    packet: Vec<u8>,
    sample: Vec<u8>,
    mask: Vec<u8>,
}

/// Protects `payload` behind the unprotected `header` whose last `pn_len` bytes are the packet
/// number, exactly as RFC 9001 section 5 describes, with the backend's AEAD and HP functions.
fn protect(
    ctx: &ngtcp2_crypto_ctx,
    (key, iv, hp_key): &(Vec<u8>, Vec<u8>, Vec<u8>),
    header: &[u8],
    pn_len: usize,
    pn: u64,
    payload: &[u8],
) -> Protected {
    let aead = AeadCtx::new(&ctx.aead, key, iv.len(), true);
    let n = nonce(iv, pn);
    let mut packet = header.to_vec();
    packet.resize(header.len() + payload.len() + ctx.aead.max_overhead, 0);
    // SAFETY: the destination has room for payload + tag; all inputs readable.
    let rv = unsafe {
        ngtcp2_crypto_encrypt(
            packet[header.len()..].as_mut_ptr(),
            &ctx.aead,
            &aead.0,
            payload.as_ptr(),
            payload.len(),
            n.as_ptr(),
            n.len(),
            header.as_ptr(),
            header.len(),
        )
    };
    assert_eq!(rv, 0);
    let pn_offset = header.len() - pn_len;
    let sample = packet[pn_offset + 4..pn_offset + 4 + 16].to_vec();
    let mask = HpCtx::new(&ctx.hp, hp_key).mask(&ctx.hp, &sample);
    packet[0] ^= mask[0] & if header[0] & 0x80 != 0 { 0x0f } else { 0x1f };
    for i in 0..pn_len {
        packet[pn_offset + i] ^= mask[1 + i];
    }
    Protected {
        packet,
        sample,
        mask,
    }
}

/// RFC 9000 Appendix A.3: the full packet number from its truncated encoding.
fn decode_pn(largest: u64, truncated: u64, pn_len: usize) -> u64 {
    let expected = largest + 1;
    let win = 1u64 << (pn_len * 8);
    let hwin = win / 2;
    let candidate = (expected & !(win - 1)) | truncated;
    if candidate + hwin <= expected && candidate < (1 << 62) - win {
        candidate + win
    } else if candidate > expected + hwin && candidate >= win {
        candidate - win
    } else {
        candidate
    }
}

/// Removes protection again (receiver's view): header protection first, then the AEAD, with
/// `largest` the largest packet number received so far. Returns the unprotected header, the full
/// packet number and the payload; `None` when the AEAD refuses the packet.
fn unprotect(
    ctx: &ngtcp2_crypto_ctx,
    (key, iv, hp_key): &(Vec<u8>, Vec<u8>, Vec<u8>),
    packet: &[u8],
    pn_offset: usize,
    largest: u64,
) -> Option<(Vec<u8>, u64, Vec<u8>)> {
    let sample = &packet[pn_offset + 4..pn_offset + 20];
    let mask = HpCtx::new(&ctx.hp, hp_key).mask(&ctx.hp, sample);
    let mut header = packet[..pn_offset + 4].to_vec();
    header[0] ^= mask[0] & if header[0] & 0x80 != 0 { 0x0f } else { 0x1f };
    let pn_len = (header[0] & 0x03) as usize + 1;
    header.truncate(pn_offset + pn_len);
    let mut pn = 0u64;
    for i in 0..pn_len {
        header[pn_offset + i] ^= mask[1 + i];
        pn = (pn << 8) | header[pn_offset + i] as u64;
    }
    let pn = decode_pn(largest, pn, pn_len);
    let ciphertext = &packet[header.len()..];
    let mut plaintext = vec![0u8; ciphertext.len() - ctx.aead.max_overhead];
    let aead = AeadCtx::new(&ctx.aead, key, iv.len(), false);
    let n = nonce(iv, pn);
    // SAFETY: plaintext has room for ciphertext - tag; inputs readable.
    let rv = unsafe {
        ngtcp2_crypto_decrypt(
            plaintext.as_mut_ptr(),
            &ctx.aead,
            &aead.0,
            ciphertext.as_ptr(),
            ciphertext.len(),
            n.as_ptr(),
            n.len(),
            header.as_ptr(),
            header.len(),
        )
    };
    (rv == 0).then_some((header, pn, plaintext))
}

fn client_payload() -> Vec<u8> {
    let mut p = h(CLIENT_CRYPTO_FRAME);
    p.resize(CLIENT_PAYLOAD_LEN, 0);
    p
}

fn assert_hex(got: &[u8], want: &str, what: &str) {
    assert_eq!(hex::encode(got), want, "{what}");
}

// ---- RFC 9001 ----

#[test]
fn rfc9001_a1_initial_secrets_keys_ivs_and_hp_keys() {
    let ctx = initial_ctx();
    for side in [SIDE_CLIENT, SIDE_SERVER] {
        let (initial, client, server) = initial_secrets(NGTCP2_PROTO_VER_V1, side);
        assert_hex(&initial, V1_INITIAL_SECRET, "initial_secret");
        assert_hex(&client, V1_CLIENT_SECRET, "client_initial_secret");
        assert_hex(&server, V1_SERVER_SECRET, "server_initial_secret");
    }
    let (key, iv, hp) = keys(&ctx, NGTCP2_PROTO_VER_V1, &h(V1_CLIENT_SECRET));
    assert_hex(&key, V1_CLIENT_KEY, "client key");
    assert_hex(&iv, V1_CLIENT_IV, "client iv");
    assert_hex(&hp, V1_CLIENT_HP, "client hp");
    let (key, iv, hp) = keys(&ctx, NGTCP2_PROTO_VER_V1, &h(V1_SERVER_SECRET));
    assert_hex(&key, V1_SERVER_KEY, "server key");
    assert_hex(&iv, V1_SERVER_IV, "server iv");
    assert_hex(&hp, V1_SERVER_HP, "server hp");
}

#[test]
fn rfc9001_a2_client_initial_byte_for_byte() {
    let ctx = initial_ctx();
    let (_, client, _) = initial_secrets(NGTCP2_PROTO_VER_V1, SIDE_CLIENT);
    let k = keys(&ctx, NGTCP2_PROTO_VER_V1, &client);
    let payload = client_payload();
    let p = protect(&ctx, &k, &h(V1_A2_HEADER), 4, 2, &payload);
    assert_hex(&p.sample, V1_A2_SAMPLE, "sample");
    assert_hex(&p.mask, V1_A2_MASK, "mask");
    assert_eq!(p.packet.len(), 1200);
    assert_hex(&p.packet, V1_A2_PACKET, "protected client Initial");

    // The server's view of the same bytes: its rx keys are the client's.
    let (_, client_rx, _) = initial_secrets(NGTCP2_PROTO_VER_V1, SIDE_SERVER);
    let k = keys(&ctx, NGTCP2_PROTO_VER_V1, &client_rx);
    let (header, pn, plaintext) = unprotect(&ctx, &k, &h(V1_A2_PACKET), 18, 0).unwrap();
    assert_hex(&header, V1_A2_HEADER, "unprotected header");
    assert_eq!(pn, 2);
    assert_eq!(plaintext, payload);
    // A flipped ciphertext bit fails authentication.
    let mut tampered = h(V1_A2_PACKET);
    tampered[600] ^= 0x01;
    assert!(unprotect(&ctx, &k, &tampered, 18, 0).is_none());
    // So does a flipped tag bit.
    let mut tampered = h(V1_A2_PACKET);
    *tampered.last_mut().unwrap() ^= 0x80;
    assert!(unprotect(&ctx, &k, &tampered, 18, 0).is_none());
}

#[test]
fn rfc9001_a3_server_initial_byte_for_byte() {
    let ctx = initial_ctx();
    let (_, _, server) = initial_secrets(NGTCP2_PROTO_VER_V1, SIDE_SERVER);
    let k = keys(&ctx, NGTCP2_PROTO_VER_V1, &server);
    let p = protect(&ctx, &k, &h(V1_A3_HEADER), 2, 1, &h(SERVER_PAYLOAD));
    assert_hex(&p.sample, V1_A3_SAMPLE, "sample");
    assert_hex(&p.mask, V1_A3_MASK, "mask");
    assert_hex(&p.packet, V1_A3_PACKET, "protected server Initial");

    let (header, pn, plaintext) = unprotect(&ctx, &k, &h(V1_A3_PACKET), 18, 0).unwrap();
    assert_hex(&header, V1_A3_HEADER, "unprotected header");
    assert_eq!(pn, 1);
    assert_hex(&plaintext, SERVER_PAYLOAD, "payload");
}

/// The Retry Integrity Tag: AES-128-GCM over the Retry pseudo-packet (ODCID length, ODCID, Retry
/// without tag) with an empty plaintext, under the version's fixed key and nonce.
fn retry_tag(version: u32, retry_without_tag: &[u8]) -> Vec<u8> {
    mqttd_tls::init();
    let (key, nonce): (&[u8], &[u8]) = if version == NGTCP2_PROTO_VER_V2 {
        (&NGTCP2_RETRY_KEY_V2[..16], &NGTCP2_RETRY_NONCE_V2[..12])
    } else {
        (&NGTCP2_RETRY_KEY_V1[..16], &NGTCP2_RETRY_NONCE_V1[..12])
    };
    let odcid = h(DCID);
    let mut pseudo = vec![odcid.len() as u8];
    pseudo.extend_from_slice(&odcid);
    pseudo.extend_from_slice(retry_without_tag);
    let mut aead = ngtcp2_crypto_aead::default();
    // SAFETY: aead is writable.
    unsafe { ngtcp2_crypto_aead_retry(&mut aead) };
    let ctx = AeadCtx::new(&aead, key, nonce.len(), true);
    let mut tag = [0u8; 16];
    // SAFETY: tag has room for the 16-byte tag of an empty plaintext.
    let rv = unsafe {
        ngtcp2_crypto_encrypt(
            tag.as_mut_ptr(),
            &aead,
            &ctx.0,
            c"".as_ptr().cast(),
            0,
            nonce.as_ptr(),
            nonce.len(),
            pseudo.as_ptr(),
            pseudo.len(),
        )
    };
    assert_eq!(rv, 0);
    tag.to_vec()
}

#[test]
fn rfc9001_a4_retry_integrity_tag() {
    let retry = h(V1_A4_RETRY);
    let (body, tag) = retry.split_at(retry.len() - 16);
    assert_eq!(retry_tag(NGTCP2_PROTO_VER_V1, body), tag);

    // ngtcp2_crypto_write_retry builds the same Retry through the backend; it leaves the four
    // unused bits of the first byte 0 where the RFC's example sets them to 1, so its tag is that of
    // the 0xf0 variant.
    let mut out = [0u8; 256];
    let (dcid, scid, odcid) = (ngtcp2_cid::default(), cid(RETRY_SCID), cid(DCID));
    // SAFETY: buffer and CIDs live for the call.
    let n = unsafe {
        ngtcp2_crypto_write_retry(
            out.as_mut_ptr(),
            out.len(),
            NGTCP2_PROTO_VER_V1,
            &dcid,
            &scid,
            &odcid,
            RETRY_TOKEN.as_ptr(),
            RETRY_TOKEN.len(),
        )
    };
    assert_eq!(n as usize, retry.len());
    let written = &out[..n as usize];
    assert_eq!(written[0], 0xf0);
    assert_eq!(written[1..body.len()], body[1..]);
    let mut body_f0 = body.to_vec();
    body_f0[0] = 0xf0;
    assert_eq!(
        written[body.len()..],
        retry_tag(NGTCP2_PROTO_VER_V1, &body_f0)[..]
    );
    assert_ne!(written[body.len()..], *tag);
}

#[test]
fn rfc9001_a5_chacha20_poly1305_short_header_packet() {
    let ctx = mqttd_tls::crypto_ctx(CipherSuite::Chacha20Poly1305Sha256);
    let secret = h(A5_SECRET);
    let k = keys(&ctx, NGTCP2_PROTO_VER_V1, &secret);
    assert_hex(&k.0, V1_A5_KEY, "key");
    assert_hex(&k.1, V1_A5_IV, "iv");
    assert_hex(&k.2, V1_A5_HP, "hp");
    assert_hex(
        &next_secret(&ctx, NGTCP2_PROTO_VER_V1, &secret),
        V1_A5_KU,
        "ku",
    );
    assert_hex(&nonce(&k.1, A5_PN), V1_A5_NONCE, "nonce");
    let p = protect(&ctx, &k, &h(A5_HEADER), 3, A5_PN, &[0x01]);
    assert_hex(&p.sample, V1_A5_SAMPLE, "sample");
    assert_hex(&p.mask, V1_A5_MASK, "mask");
    assert_hex(&p.packet, V1_A5_PACKET, "protected packet");

    // The receiver recovers the full number from the 3-byte encoding and the largest it has seen.
    let (header, pn, plaintext) = unprotect(&ctx, &k, &h(V1_A5_PACKET), 1, A5_PN - 300).unwrap();
    assert_hex(&header, A5_HEADER, "unprotected header");
    assert_eq!(pn, A5_PN);
    assert_eq!(plaintext, [0x01]);
}

// ---- RFC 9369 (QUIC v2) ----

#[test]
fn rfc9369_a1_v2_initial_secrets_keys_ivs_and_hp_keys() {
    let ctx = initial_ctx();
    for side in [SIDE_CLIENT, SIDE_SERVER] {
        let (initial, client, server) = initial_secrets(NGTCP2_PROTO_VER_V2, side);
        assert_hex(&initial, V2_INITIAL_SECRET, "v2 initial_secret");
        assert_hex(&client, V2_CLIENT_SECRET, "v2 client_initial_secret");
        assert_hex(&server, V2_SERVER_SECRET, "v2 server_initial_secret");
    }
    let (key, iv, hp) = keys(&ctx, NGTCP2_PROTO_VER_V2, &h(V2_CLIENT_SECRET));
    assert_hex(&key, V2_CLIENT_KEY, "v2 client key");
    assert_hex(&iv, V2_CLIENT_IV, "v2 client iv");
    assert_hex(&hp, V2_CLIENT_HP, "v2 client hp");
    let (key, iv, hp) = keys(&ctx, NGTCP2_PROTO_VER_V2, &h(V2_SERVER_SECRET));
    assert_hex(&key, V2_SERVER_KEY, "v2 server key");
    assert_hex(&iv, V2_SERVER_IV, "v2 server iv");
    assert_hex(&hp, V2_SERVER_HP, "v2 server hp");
}

#[test]
fn rfc9369_a2_a3_v2_initials_byte_for_byte() {
    let ctx = initial_ctx();
    let (_, client, server) = initial_secrets(NGTCP2_PROTO_VER_V2, SIDE_CLIENT);
    let k = keys(&ctx, NGTCP2_PROTO_VER_V2, &client);
    let p = protect(&ctx, &k, &h(V2_A2_HEADER), 4, 2, &client_payload());
    assert_hex(&p.sample, V2_A2_SAMPLE, "v2 client sample");
    assert_hex(&p.mask, V2_A2_MASK, "v2 client mask");
    assert_hex(&p.packet, V2_A2_PACKET, "v2 protected client Initial");

    let k = keys(&ctx, NGTCP2_PROTO_VER_V2, &server);
    let p = protect(&ctx, &k, &h(V2_A3_HEADER), 2, 1, &h(SERVER_PAYLOAD));
    assert_hex(&p.sample, V2_A3_SAMPLE, "v2 server sample");
    assert_hex(&p.mask, V2_A3_MASK, "v2 server mask");
    assert_hex(&p.packet, V2_A3_PACKET, "v2 protected server Initial");
}

#[test]
fn rfc9369_a4_a5_v2_retry_tag_and_chacha20_packet() {
    let retry = h(V2_A4_RETRY);
    let (body, tag) = retry.split_at(retry.len() - 16);
    assert_eq!(retry_tag(NGTCP2_PROTO_VER_V2, body), tag);

    let ctx = mqttd_tls::crypto_ctx(CipherSuite::Chacha20Poly1305Sha256);
    let secret = h(A5_SECRET);
    let k = keys(&ctx, NGTCP2_PROTO_VER_V2, &secret);
    assert_hex(&k.0, V2_A5_KEY, "v2 key");
    assert_hex(&k.1, V2_A5_IV, "v2 iv");
    assert_hex(&k.2, V2_A5_HP, "v2 hp");
    assert_hex(
        &next_secret(&ctx, NGTCP2_PROTO_VER_V2, &secret),
        V2_A5_KU,
        "v2 ku",
    );
    assert_hex(&nonce(&k.1, A5_PN), V2_A5_NONCE, "v2 nonce");
    let p = protect(&ctx, &k, &h(A5_HEADER), 3, A5_PN, &[0x01]);
    assert_hex(&p.sample, V2_A5_SAMPLE, "v2 sample");
    assert_hex(&p.mask, V2_A5_MASK, "v2 mask");
    assert_hex(&p.packet, V2_A5_PACKET, "v2 protected packet");
}

/// The RFC's Retry, delivered to an ngtcp2 client that sent A.2's Initial (DCID 0x8394c8f03e515708,
/// empty SCID): the client verifies the tag through the backend and retries with the token; the same
/// Retry with one tag bit flipped is dropped.
#[test]
fn rfc9001_a4_retry_accepted_by_an_ngtcp2_client() {
    let pki = support::TestPki::new();
    let cfg = pki.client_config(&[b"mqtt"]);
    for tamper in [false, true] {
        let mut client = support::Side::client_with_cids(
            &cfg,
            "localhost",
            NGTCP2_PROTO_VER_V1,
            cid(DCID),
            ngtcp2_cid::default(),
            0,
        );
        let first = client.send(0).unwrap();
        assert!(!first.is_empty());
        let mut retry = h(V1_A4_RETRY);
        if tamper {
            *retry.last_mut().unwrap() ^= 0x01;
        }
        let rv = client.recv(&retry, 1);
        assert_eq!(rv, 0, "read_pkt");
        // SAFETY: live connection.
        let after_retry = unsafe { ngtcp2_conn_after_retry(client.conn) } != 0;
        assert_eq!(after_retry, !tamper);
        if tamper {
            continue;
        }
        let second = client.send(1).unwrap();
        let mut hd = MaybeUninit::<ngtcp2_pkt_hd>::zeroed();
        // SAFETY: hd writable, datagram readable.
        let n = unsafe {
            ngtcp2_pkt_decode_hd_long(hd.as_mut_ptr(), second[0].as_ptr(), second[0].len())
        };
        assert!(n > 0, "decode: {n}");
        // SAFETY: decoded above.
        let hd = unsafe { hd.assume_init() };
        assert_eq!(hd.dcid.data[..hd.dcid.datalen], h(RETRY_SCID)[..]);
        assert!(!hd.token.is_null());
        // SAFETY: token points into second[0], tokenlen bytes.
        let token = unsafe { std::slice::from_raw_parts(hd.token, hd.tokenlen) };
        assert_eq!(token, RETRY_TOKEN);
    }
}
