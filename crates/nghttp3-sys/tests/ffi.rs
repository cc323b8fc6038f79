//! The bindings link against the pinned nghttp3 and QPACK works through them.

use std::ffi::CStr;
use std::ptr;

use mqttd_nghttp3_sys::*;

#[test]
fn version_is_the_pinned_one() {
    // SAFETY: nghttp3_version returns a pointer to a static struct.
    let info = unsafe { nghttp3_version(0) };
    assert!(!info.is_null());
    // SAFETY: non-null static info; version_str is a C string.
    let (num, text) = unsafe { ((*info).version_num, CStr::from_ptr((*info).version_str)) };
    assert_eq!(text.to_str().unwrap(), "1.18.0");
    assert_eq!(num, 0x011200);
}

fn buf_bytes(buf: &nghttp3_buf) -> &[u8] {
    if buf.pos.is_null() {
        return &[];
    }
    // SAFETY: pos..last is the initialised, readable part of a buffer nghttp3 allocated.
    unsafe { std::slice::from_raw_parts(buf.pos, buf.last.offset_from(buf.pos) as usize) }
}

fn rcbuf_bytes(rcbuf: *mut nghttp3_rcbuf) -> Vec<u8> {
    // SAFETY: rcbuf is a live reference-counted buffer handed out by the decoder.
    let vec = unsafe { nghttp3_rcbuf_get_buf(rcbuf) };
    // SAFETY: vec.base points at vec.len readable bytes while rcbuf is alive.
    unsafe { std::slice::from_raw_parts(vec.base, vec.len) }.to_vec()
}

#[test]
fn qpack_round_trips_a_large_header_block() {
    let big = "v".repeat(4096);
    let mut fields: Vec<(String, String)> = vec![
        (":method".into(), "POST".into()),
        (":scheme".into(), "https".into()),
        (":authority".into(), "broker.example".into()),
        (":path".into(), "/mqtt/metrics?format=prometheus".into()),
        ("content-type".into(), "text/plain; version=0.0.4".into()),
        ("x-large".into(), big.clone()),
    ];
    for i in 0..20 {
        fields.push((format!("x-field-{i}"), format!("value number {i}")));
    }
    let nva: Vec<nghttp3_nv> = fields
        .iter()
        .map(|(n, v)| nghttp3_nv {
            name: n.as_ptr(),
            value: v.as_ptr(),
            namelen: n.len(),
            valuelen: v.len(),
            flags: NGHTTP3_NV_FLAG_NONE as u8,
        })
        .collect();

    // SAFETY: the default allocator is a static struct.
    let mem = unsafe { nghttp3_mem_default() };
    let mut encoder = ptr::null_mut();
    let mut decoder = ptr::null_mut();
    let mut sctx = ptr::null_mut();
    let mut pbuf = nghttp3_buf::default();
    let mut rbuf = nghttp3_buf::default();
    let mut ebuf = nghttp3_buf::default();
    let stream_id = 0;
    // SAFETY: out-pointers are valid; nva points at `fields`, which outlives the call; the
    // buffers start empty and are grown by nghttp3 with `mem`.
    unsafe {
        assert_eq!(nghttp3_qpack_encoder_new(&mut encoder, 4096, mem), 0);
        nghttp3_qpack_encoder_set_max_dtable_capacity(encoder, 4096);
        nghttp3_qpack_encoder_set_max_blocked_streams(encoder, 16);
        assert_eq!(nghttp3_qpack_decoder_new(&mut decoder, 4096, 16, mem), 0);
        assert_eq!(
            nghttp3_qpack_decoder_set_max_dtable_capacity(decoder, 4096),
            0
        );
        assert_eq!(
            nghttp3_qpack_stream_context_new(&mut sctx, stream_id, mem),
            0
        );
        assert_eq!(
            nghttp3_qpack_encoder_encode(
                encoder,
                &mut pbuf,
                &mut rbuf,
                &mut ebuf,
                stream_id,
                nva.as_ptr(),
                nva.len()
            ),
            0
        );
    }

    let encoder_stream = buf_bytes(&ebuf).to_vec();
    let mut request = buf_bytes(&pbuf).to_vec();
    request.extend_from_slice(buf_bytes(&rbuf));
    assert!(!request.is_empty());

    // SAFETY: decoder is live; the slice is readable for its length.
    let read = unsafe {
        nghttp3_qpack_decoder_read_encoder(decoder, encoder_stream.as_ptr(), encoder_stream.len())
    };
    assert_eq!(read, encoder_stream.len() as isize);

    let mut decoded = Vec::new();
    let mut input = &request[..];
    let mut final_seen = false;
    for _ in 0..1000 {
        let mut nv = nghttp3_qpack_nv {
            name: ptr::null_mut(),
            value: ptr::null_mut(),
            token: 0,
            flags: 0,
        };
        let mut flags = 0u8;
        // SAFETY: decoder and sctx are live; input is readable; nv and flags are writable.
        let n = unsafe {
            nghttp3_qpack_decoder_read_request(
                decoder,
                sctx,
                &mut nv,
                &mut flags,
                input.as_ptr(),
                input.len(),
                1,
            )
        };
        assert!(n >= 0, "decode error {n}");
        input = &input[n as usize..];
        if u32::from(flags) & NGHTTP3_QPACK_DECODE_FLAG_EMIT != 0 {
            decoded.push((rcbuf_bytes(nv.name), rcbuf_bytes(nv.value)));
            // SAFETY: the decoder gave us one reference to each buffer; we give it back.
            unsafe {
                nghttp3_rcbuf_decref(nv.name);
                nghttp3_rcbuf_decref(nv.value);
            }
        }
        assert_eq!(
            u32::from(flags) & NGHTTP3_QPACK_DECODE_FLAG_BLOCKED,
            0,
            "blocked"
        );
        if u32::from(flags) & NGHTTP3_QPACK_DECODE_FLAG_FINAL != 0 {
            final_seen = true;
            break;
        }
    }
    assert!(final_seen, "the field section never completed");
    let expected: Vec<(Vec<u8>, Vec<u8>)> = fields
        .iter()
        .map(|(n, v)| (n.clone().into_bytes(), v.clone().into_bytes()))
        .collect();
    assert_eq!(decoded, expected);

    // SAFETY: every object is freed exactly once with the allocator that made it.
    unsafe {
        nghttp3_buf_free(&mut pbuf, mem);
        nghttp3_buf_free(&mut rbuf, mem);
        nghttp3_buf_free(&mut ebuf, mem);
        nghttp3_qpack_stream_context_del(sctx);
        nghttp3_qpack_decoder_del(decoder);
        nghttp3_qpack_encoder_del(encoder);
    }
}
