//! One connection's TLS state, glued to an `ngtcp2_conn` through OpenSSL 3.5's QUIC TLS callbacks.
//!
//! Ownership and threading: a [`TlsSession`] lives in a `Box` owned by the QUIC connection that
//! attached it; OpenSSL (callback `arg`) and ngtcp2 (TLS native handle) both hold its address, so it
//! never moves. It is touched only from the task that drives its connection: ngtcp2 calls into the
//! backend, the backend calls OpenSSL, OpenSSL calls the callbacks here, all on one stack.

use std::any::Any;
use std::collections::VecDeque;
use std::ffi::{c_int, c_uchar, c_void};
use std::ptr;

use foreign_types::ForeignType;
use mqttd_ngtcp2_sys::*;
use openssl::ssl::Ssl;
use openssl::x509::X509VerifyResult;
use openssl_sys as ffi;

use crate::backend::CipherSuite;
use crate::config::{
    ClientConfig, ServerConfig, alpn_offer_index, alpn_wire, cache_key_index, groups_index,
};
use crate::error::{TlsError, alert_name};
use crate::ossl::*;

/// Which side of the handshake this is.
enum Role {
    Server,
    Client {
        config: ClientConfig,
        key: String,
        early_attempted: bool,
    },
}

/// What a server's session still answers once it released its OpenSSL state.
struct Negotiated {
    alpn: Option<Vec<u8>>,
    server_name: Option<String>,
    cipher_suite: Option<CipherSuite>,
    group: Option<String>,
    session_reused: bool,
    early_data_accepted: bool,
}

/// The OpenSSL side of a session: live while the handshake runs (and, on a client, for the
/// whole connection: session tickets arrive after the handshake); on a server, released once the
/// handshake completed and its session tickets were handed to ngtcp2.
enum State {
    Live(Ssl),
    Released(Box<Negotiated>),
}

/// One connection's TLS state; see the module docs for the ownership rules.
pub struct TlsSession {
    // Declared first so it is freed first: OpenSSL may call back while freeing, and the callbacks
    // then find `conn_ref` detached and touch nothing else.
    state: State,
    conn_ref: ngtcp2_crypto_conn_ref,
    role: Role,
    tx_level: ngtcp2_encryption_level,
    /// CRYPTO data received from the peer; chunks never move once pushed (OpenSSL holds
    /// pointers into the ones it was handed until it releases them).
    rx: VecDeque<Vec<u8>>,
    /// How many chunks at the front of `rx` were handed to OpenSSL.
    rx_handed: usize,
    /// Bytes of handed chunks OpenSSL released but that did not yet free a whole chunk.
    rx_released: usize,
    local_params: Vec<u8>,
    alert_sent: Option<u8>,
    error: Option<TlsError>,
    panic_in: Option<&'static str>,
}

/// TLS alert `unexpected_message`.
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;

unsafe extern "C" fn get_conn(conn_ref: *mut ngtcp2_crypto_conn_ref) -> *mut ngtcp2_conn {
    // SAFETY: ngtcp2 passes back the conn_ref we own; user_data is the attached conn or null.
    unsafe { (*conn_ref).user_data.cast() }
}

/// Renders a caught panic payload.
pub(crate) fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl TlsSession {
    /// A server-side session for one incoming connection.
    pub fn server(config: &ServerConfig) -> Result<Box<TlsSession>, TlsError> {
        let ssl = Ssl::new(&config.inner.ctx)?;
        let ptr = ssl.as_ptr();
        let session = Self::new(ssl, Role::Server)?;
        // SAFETY: the SSL is live and owned by the session.
        unsafe {
            ffi::SSL_set_accept_state(ptr);
            if config.inner.early_data && SSL_set_quic_tls_early_data_enabled(ptr, 1) != 1 {
                return Err(TlsError::Openssl(openssl::error::ErrorStack::get()));
            }
        }
        Ok(session)
    }

    /// A client-side session connecting to `server_name`: a DNS name is sent as SNI and checked
    /// against the certificate; an IP address is checked against the certificate's IP entries.
    pub fn client(config: &ClientConfig, server_name: &str) -> Result<Box<TlsSession>, TlsError> {
        let mut ssl = Ssl::new(&config.inner.ctx)?;
        let param = ssl.param_mut();
        match server_name.parse::<std::net::IpAddr>() {
            Ok(ip) => param.set_ip(ip)?,
            Err(_) => {
                param.set_host(server_name)?;
                ssl.set_hostname(server_name)?;
            }
        }
        ssl.set_alpn_protos(&alpn_wire(&config.inner.alpn)?)?;
        ssl.set_ex_data(cache_key_index(), server_name.to_owned());
        let mut try_early = false;
        // A ticket is used once: TLS 1.3 clients should not reuse tickets (RFC 8446, C.4).
        let ticket = config
            .inner
            .cache
            .lock()
            .ok()
            .and_then(|mut c| c.tickets.remove(server_name));
        if let Some(ticket) = &ticket {
            // SAFETY: the session comes from a connection made with this same context.
            unsafe { ssl.set_session(ticket)? };
            try_early = config.inner.early_data && ticket.max_early_data() > 0;
        }
        let role = Role::Client {
            config: config.clone(),
            key: server_name.to_owned(),
            early_attempted: false,
        };
        let ptr = ssl.as_ptr();
        let mut session = Self::new(ssl, role)?;
        // SAFETY: live SSL owned by the session; early data can only be enabled once the QUIC TLS
        // callbacks are installed (OpenSSL checks that) and before the handshake starts.
        unsafe {
            ffi::SSL_set_connect_state(ptr);
            if try_early
                && SSL_set_quic_tls_early_data_enabled(ptr, 1) == 1
                && let Role::Client {
                    early_attempted, ..
                } = &mut session.role
            {
                *early_attempted = true;
            }
        }
        Ok(session)
    }

    fn new(ssl: Ssl, role: Role) -> Result<Box<TlsSession>, TlsError> {
        let ptr = ssl.as_ptr();
        let mut session = Box::new(TlsSession {
            state: State::Live(ssl),
            conn_ref: ngtcp2_crypto_conn_ref {
                get_conn: Some(get_conn),
                user_data: ptr::null_mut(),
            },
            role,
            tx_level: ngtcp2_encryption_level_NGTCP2_ENCRYPTION_LEVEL_INITIAL,
            rx: VecDeque::new(),
            rx_handed: 0,
            rx_released: 0,
            local_params: Vec::new(),
            alert_sent: None,
            error: None,
            panic_in: None,
        });
        let arg: *mut TlsSession = &mut *session;
        // SAFETY: the dispatch table is static; `arg` points into the Box, which never moves and
        // outlives the SSL (the SSL is a field of it, freed first).
        let ok = unsafe { SSL_set_quic_tls_cbs(ptr, DISPATCH.as_ptr(), arg.cast()) };
        if ok != 1 {
            return Err(TlsError::Openssl(openssl::error::ErrorStack::get()));
        }
        Ok(session)
    }

    /// Installs this session as `conn`'s TLS native handle and crypto conn_ref.
    ///
    /// # Safety
    /// `conn` must be a live connection, `self` must outlive every ngtcp2 call made on `conn`
    /// afterwards, and [`detach`](Self::detach) must be called before `ngtcp2_conn_del(conn)`.
    pub unsafe fn attach(&mut self, conn: *mut ngtcp2_conn) {
        self.conn_ref.user_data = conn.cast();
        let handle: *mut TlsSession = self;
        // SAFETY: caller guarantees conn is live; the handle stays valid per the contract.
        unsafe { ngtcp2_conn_set_tls_native_handle(conn, handle.cast()) };
    }

    /// Forgets the connection: later TLS callbacks do nothing.
    pub fn detach(&mut self) {
        self.conn_ref.user_data = ptr::null_mut();
    }

    /// The `ngtcp2_crypto_conn_ref` of this session (its `get_conn` yields the attached conn).
    pub fn conn_ref(&mut self) -> *mut ngtcp2_crypto_conn_ref {
        &mut self.conn_ref
    }

    fn conn(&self) -> *mut ngtcp2_conn {
        self.conn_ref.user_data.cast()
    }

    /// Whether this is the server side.
    pub fn is_server(&self) -> bool {
        matches!(self.role, Role::Server)
    }

    /// The negotiated ALPN protocol, once the handshake got that far.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match &self.state {
            State::Live(ssl) => ssl.selected_alpn_protocol().map(<[u8]>::to_vec),
            State::Released(n) => n.alpn.clone(),
        }
    }

    /// The server name the client asked for (SNI), or the one this client connects to.
    pub fn server_name(&self) -> Option<String> {
        match (&self.role, &self.state) {
            (Role::Client { key, .. }, _) => Some(key.clone()),
            (Role::Server, State::Live(ssl)) => ssl
                .servername(openssl::ssl::NameType::HOST_NAME)
                .map(str::to_owned),
            (Role::Server, State::Released(n)) => n.server_name.clone(),
        }
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        match &self.state {
            // For 0-RTT OpenSSL reports the resumed session's cipher here too.
            State::Live(ssl) => CipherSuite::from_protocol_id(ssl.current_cipher()?.protocol_id()),
            State::Released(n) => n.cipher_suite,
        }
    }

    /// The negotiated key exchange group, once the handshake got that far, as OpenSSL names it
    /// (`"X25519MLKEM768"`, `"x25519"`, `"secp256r1"`, ...; compare case-insensitively).
    pub fn key_exchange_group(&self) -> Option<String> {
        let ssl = match &self.state {
            State::Live(ssl) => ssl,
            State::Released(n) => return n.group.clone(),
        };
        // SAFETY: plain getter on the live SSL; the result is null or a static NUL-terminated name.
        let name = unsafe { SSL_get0_group_name(ssl.as_ptr()) };
        if name.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, static (OpenSSL's group table).
        let name = unsafe { std::ffi::CStr::from_ptr(name) };
        Some(name.to_string_lossy().into_owned())
    }

    /// Whether a server's session released its OpenSSL state (it does once the handshake
    /// completed and its session tickets went out: an idle connection then holds no handshake
    /// leftovers such as the peer's key share; what the getters report was kept).
    pub fn is_released(&self) -> bool {
        matches!(self.state, State::Released(_))
    }

    /// Server, handshake complete: keeps what the getters report and frees the SSL.
    fn release(&mut self) {
        let State::Live(ssl) = &self.state else {
            return;
        };
        // SAFETY: plain setter on the live SSL. The connection is healthy: marking it shut down
        // keeps OpenSSL from treating its session as bad (and dropping it from the cache) on free.
        unsafe {
            ffi::SSL_set_shutdown(
                ssl.as_ptr(),
                ffi::SSL_SENT_SHUTDOWN | ffi::SSL_RECEIVED_SHUTDOWN,
            )
        };
        let negotiated = Negotiated {
            alpn: self.alpn(),
            server_name: self.server_name(),
            cipher_suite: self.cipher_suite(),
            group: self.key_exchange_group(),
            session_reused: self.session_reused(),
            early_data_accepted: self.early_data_accepted(),
        };
        // Callbacks OpenSSL makes while freeing find no connection and do nothing.
        let conn = std::mem::replace(&mut self.conn_ref.user_data, ptr::null_mut());
        self.state = State::Released(Box::new(negotiated));
        self.conn_ref.user_data = conn;
        self.rx = VecDeque::new();
        self.rx_handed = 0;
        self.rx_released = 0;
        // OpenSSL held a pointer to these; the SSL is gone.
        self.local_params = Vec::new();
    }

    /// On a server, the key exchange groups the client offered (`SSL_get1_groups`), by name.
    fn offered_groups(&self) -> Vec<String> {
        let State::Live(ssl) = &self.state else {
            return Vec::new();
        };
        let ssl = ssl.as_ptr();
        // SAFETY: SSL_get1_groups with a null list returns the count only.
        let n = unsafe { ffi::SSL_ctrl(ssl, SSL_CTRL_GET_GROUPS, 0, ptr::null_mut()) };
        let Ok(n) = usize::try_from(n) else {
            return Vec::new();
        };
        let mut ids: Vec<c_int> = vec![0; n.min(64)];
        if ids.len() < n {
            return Vec::new();
        }
        // SAFETY: the list has room for the `n` ids OpenSSL just reported.
        unsafe { ffi::SSL_ctrl(ssl, SSL_CTRL_GET_GROUPS, 0, ids.as_mut_ptr().cast()) };
        ids.iter()
            .map(|&id| {
                // SAFETY: live SSL; the result is null or a static NUL-terminated name.
                let name = unsafe { SSL_group_to_name(ssl, id) };
                if name.is_null() {
                    format!("0x{id:04x}")
                } else {
                    // SAFETY: as above.
                    unsafe { std::ffi::CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned()
                }
            })
            .collect()
    }

    /// Whether the session resumed an earlier one (ticket accepted).
    pub fn session_reused(&self) -> bool {
        match &self.state {
            State::Live(ssl) => ssl.session_reused(),
            State::Released(n) => n.session_reused,
        }
    }

    /// Whether 0-RTT data was accepted (meaningful once the handshake completed).
    pub fn early_data_accepted(&self) -> bool {
        match &self.state {
            // SAFETY: plain getter on the live SSL.
            State::Live(ssl) => unsafe {
                SSL_get_early_data_status(ssl.as_ptr()) == SSL_EARLY_DATA_ACCEPTED
            },
            State::Released(n) => n.early_data_accepted,
        }
    }

    /// Client: the 0-RTT transport parameters remembered for this server, if 0-RTT is attempted.
    pub fn early_transport_params(&self) -> Option<Vec<u8>> {
        match &self.role {
            Role::Client {
                config,
                key,
                early_attempted: true,
            } => config
                .inner
                .cache
                .lock()
                .ok()
                .and_then(|c| c.early_params.get(key).cloned()),
            _ => None,
        }
    }

    /// Client: remembers the server's 0-RTT transport parameters (as encoded by
    /// `ngtcp2_conn_encode_0rtt_transport_params`) for the next connection to the same name.
    pub fn store_early_transport_params(&self, params: &[u8]) {
        if let Role::Client { config, key, .. } = &self.role
            && let Ok(mut cache) = config.inner.cache.lock()
        {
            cache.early_params.insert(key.clone(), params.to_vec());
        }
    }

    /// Why the handshake failed, if it did.
    pub fn take_error(&mut self) -> Option<TlsError> {
        self.error.take()
    }

    /// The TLS alert this side sent, if any.
    pub fn alert_sent(&self) -> Option<u8> {
        self.alert_sent
    }

    /// Test hook: makes the named callback (`"crypto_send"`, `"yield_secret"`, `"recv_rcd"`,
    /// `"got_transport_params"`, `"read_write_crypto_data"`) panic on its next call.
    #[doc(hidden)]
    pub fn inject_panic(&mut self, callback: &'static str) {
        self.panic_in = Some(callback);
    }

    fn maybe_panic(&mut self, callback: &'static str) {
        if self.panic_in == Some(callback) {
            self.panic_in = None;
            panic!("injected panic in {callback}");
        }
    }

    fn peer(&self) -> String {
        match &self.role {
            Role::Server => "client".to_owned(),
            Role::Client { key, .. } => format!("server {key}"),
        }
    }

    /// Builds the error for a failed handshake from what OpenSSL and the callbacks recorded.
    fn record_failure(&mut self) {
        let stack = openssl::error::ErrorStack::get();
        if self.error.is_some() {
            return;
        }
        let peer = self.peer();
        let State::Live(ssl) = &self.state else {
            return;
        };
        let error = match self.alert_sent {
            Some(alert) => {
                let mut detail = String::new();
                let verify = ssl.verify_result();
                if verify != X509VerifyResult::OK {
                    detail = format!(
                        ": certificate verification failed: {}",
                        verify.error_string()
                    );
                } else if alert == 120 {
                    let offered = ssl
                        .ex_data(alpn_offer_index())
                        .map(|w| alpn_list(w))
                        .unwrap_or_default();
                    detail = format!(": no common ALPN protocol (the client offered {offered})");
                } else if alert == 116 {
                    detail = ": the client sent no certificate and one is required".to_owned();
                } else if stack.errors().iter().any(|e| {
                    e.library_code() == ERR_LIB_SSL
                        && matches!(
                            e.reason_code(),
                            SSL_R_NO_SUITABLE_KEY_SHARE | SSL_R_NO_SHARED_GROUPS
                        )
                }) {
                    let ours = ssl
                        .ssl_context()
                        .ex_data(groups_index())
                        .cloned()
                        .unwrap_or_else(|| "OpenSSL's default".to_owned());
                    detail = if self.is_server() {
                        format!(
                            ": no key exchange group in common with the client (it offered [{}], \
                             this server accepts {ours}; see the `groups` TLS option)",
                            self.offered_groups().join(", ")
                        )
                    } else {
                        format!(
                            ": no key exchange group in common with the server (this client \
                             offers {ours}; see the `groups` TLS option)"
                        )
                    };
                } else if !stack.errors().is_empty() {
                    detail = format!(": {stack}");
                }
                TlsError::AlertSent {
                    peer,
                    alert,
                    name: alert_name(alert),
                    detail,
                }
            }
            None => TlsError::Handshake {
                peer,
                detail: stack.to_string(),
            },
        };
        tracing::debug!(error = %error, "TLS handshake failed");
        self.error = Some(error);
    }

    fn record_panic(&mut self, panic: Box<dyn Any + Send>) {
        let text = panic_text(&*panic);
        tracing::error!(panic = %text, "panic in a TLS callback, caught at the FFI boundary");
        self.error = Some(TlsError::CallbackPanicked(text));
    }

    /// Feeds CRYPTO data from ngtcp2 to OpenSSL and drives the handshake (backend entry point).
    pub(crate) fn read_write_crypto_data(&mut self, conn: *mut ngtcp2_conn, data: &[u8]) -> c_int {
        self.maybe_panic("read_write_crypto_data");
        let ssl = match &self.state {
            State::Live(ssl) => ssl.as_ptr(),
            // A released server session: the handshake is over and a QUIC client has nothing
            // more to say to TLS (no KeyUpdate, no post-handshake authentication, RFC 9001 6
            // and 4.4), so any post-handshake message is unexpected.
            State::Released(_) if data.is_empty() => return 0,
            State::Released(_) => {
                self.alert_sent = Some(ALERT_UNEXPECTED_MESSAGE);
                // SAFETY: conn is the live connection ngtcp2 is calling us for.
                unsafe { ngtcp2_conn_set_tls_alert(conn, ALERT_UNEXPECTED_MESSAGE) };
                self.error = Some(TlsError::AlertSent {
                    peer: self.peer(),
                    alert: ALERT_UNEXPECTED_MESSAGE,
                    name: alert_name(ALERT_UNEXPECTED_MESSAGE),
                    detail: ": a TLS message after the handshake".to_owned(),
                });
                return -1;
            }
        };
        if !data.is_empty() {
            self.rx.push_back(data.to_vec());
        }
        // SAFETY: conn is the live connection ngtcp2 is calling us for; ssl is ours.
        unsafe {
            if ngtcp2_conn_get_handshake_completed(conn) == 0 {
                let rv = ffi::SSL_do_handshake(ssl);
                if rv <= 0 {
                    return match ffi::SSL_get_error(ssl, rv) {
                        ffi::SSL_ERROR_WANT_READ | ffi::SSL_ERROR_WANT_WRITE => 0,
                        _ => {
                            self.record_failure();
                            -1
                        }
                    };
                }
                if let Role::Client {
                    early_attempted: true,
                    ..
                } = self.role
                    && SSL_get_early_data_status(ssl) != SSL_EARLY_DATA_ACCEPTED
                    && ngtcp2_conn_tls_early_data_rejected(conn) != 0
                {
                    return -1;
                }
                ngtcp2_conn_tls_handshake_completed(conn);
            }
            // Post-handshake messages (NewSessionTicket, key updates of TLS itself).
            let rv = ffi::SSL_read(ssl, ptr::null_mut(), 0);
            if rv != 1 {
                match ffi::SSL_get_error(ssl, rv) {
                    ffi::SSL_ERROR_WANT_READ | ffi::SSL_ERROR_WANT_WRITE => {}
                    _ => {
                        self.record_failure();
                        return -1;
                    }
                }
            }
            // A server's TLS is done once OpenSSL is back in TLS_ST_OK after the client's
            // Finished (SSL_do_handshake above returns at the server's own Finished, so that
            // 0.5-RTT data can flow): its session tickets went out as the last step, and ngtcp2
            // copied them. The SSL, the peer's key share and the handshake buffers would sit idle
            // for the rest of the connection, so they go now. A client keeps its SSL: tickets
            // arrive after its handshake.
            if self.is_server() && SSL_get_state(ssl) == TLS_ST_OK {
                self.release();
            }
        }
        0
    }

    /// Hands our transport parameters to OpenSSL (backend entry point).
    pub(crate) fn set_local_transport_params(&mut self, params: &[u8]) -> c_int {
        // OpenSSL keeps the pointer: the bytes must live as long as the SSL.
        let State::Live(ssl) = &self.state else {
            return -1;
        };
        let ssl = ssl.as_ptr();
        self.local_params = params.to_vec();
        // SAFETY: local_params is owned by the session and outlives the SSL's use of it.
        let ok = unsafe {
            SSL_set_quic_tls_transport_params(
                ssl,
                self.local_params.as_ptr(),
                self.local_params.len(),
            )
        };
        if ok == 1 { 0 } else { -1 }
    }

    fn level_from_ossl(level: u32) -> Option<ngtcp2_encryption_level> {
        match level {
            OSSL_RECORD_PROTECTION_LEVEL_NONE => {
                Some(ngtcp2_encryption_level_NGTCP2_ENCRYPTION_LEVEL_INITIAL)
            }
            OSSL_RECORD_PROTECTION_LEVEL_EARLY => {
                Some(ngtcp2_encryption_level_NGTCP2_ENCRYPTION_LEVEL_0RTT)
            }
            OSSL_RECORD_PROTECTION_LEVEL_HANDSHAKE => {
                Some(ngtcp2_encryption_level_NGTCP2_ENCRYPTION_LEVEL_HANDSHAKE)
            }
            OSSL_RECORD_PROTECTION_LEVEL_APPLICATION => {
                Some(ngtcp2_encryption_level_NGTCP2_ENCRYPTION_LEVEL_1RTT)
            }
            _ => None,
        }
    }

    fn crypto_send(&mut self, buf: &[u8], consumed: &mut usize) -> c_int {
        self.maybe_panic("crypto_send");
        let conn = self.conn();
        if conn.is_null() {
            *consumed = buf.len();
            return 1;
        }
        // SAFETY: conn is live while attached; ngtcp2 copies the data.
        let rv =
            unsafe { ngtcp2_conn_submit_crypto_data(conn, self.tx_level, buf.as_ptr(), buf.len()) };
        if rv != 0 {
            // SAFETY: as above.
            unsafe { ngtcp2_conn_set_tls_error(conn, rv) };
            return 0;
        }
        *consumed = buf.len();
        1
    }

    fn recv_rcd(&mut self, buf: &mut *const c_uchar, bytes_read: &mut usize) -> c_int {
        self.maybe_panic("recv_rcd");
        match self.rx.get(self.rx_handed) {
            Some(chunk) if !self.conn().is_null() => {
                *buf = chunk.as_ptr();
                *bytes_read = chunk.len();
                self.rx_handed += 1;
            }
            _ => {
                *buf = ptr::null();
                *bytes_read = 0;
            }
        }
        1
    }

    fn release_rcd(&mut self, released: usize) -> c_int {
        if self.conn().is_null() {
            return 1;
        }
        self.rx_released += released;
        while self.rx_handed > 0 {
            let Some(front) = self.rx.front() else { break };
            if self.rx_released < front.len() {
                break;
            }
            self.rx_released -= front.len();
            self.rx.pop_front();
            self.rx_handed -= 1;
        }
        1
    }

    fn yield_secret(&mut self, level: u32, direction: c_int, secret: &[u8]) -> c_int {
        self.maybe_panic("yield_secret");
        let conn = self.conn();
        if conn.is_null() {
            return 1;
        }
        let Some(level) = Self::level_from_ossl(level) else {
            return 0;
        };
        // SAFETY: conn is live; the secret is readable; null outputs ask ngtcp2 to keep the keys
        // itself.
        let rv = unsafe {
            if direction != 0 {
                ngtcp2_crypto_derive_and_install_tx_key(
                    conn,
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    level,
                    secret.as_ptr(),
                    secret.len(),
                )
            } else {
                ngtcp2_crypto_derive_and_install_rx_key(
                    conn,
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    level,
                    secret.as_ptr(),
                    secret.len(),
                )
            }
        };
        if rv != 0 {
            return 0;
        }
        if direction != 0 {
            self.tx_level = level;
        }
        1
    }

    fn got_transport_params(&mut self, params: &[u8]) -> c_int {
        self.maybe_panic("got_transport_params");
        let conn = self.conn();
        if conn.is_null() {
            return 1;
        }
        // SAFETY: conn is live; params readable.
        let rv = unsafe {
            ngtcp2_conn_decode_and_set_remote_transport_params(conn, params.as_ptr(), params.len())
        };
        if rv != 0 {
            // SAFETY: as above.
            unsafe { ngtcp2_conn_set_tls_error(conn, rv) };
            return 0;
        }
        1
    }

    fn alert(&mut self, code: u8) -> c_int {
        self.alert_sent = Some(code);
        let conn = self.conn();
        if !conn.is_null() {
            // SAFETY: conn is live while attached.
            unsafe { ngtcp2_conn_set_tls_alert(conn, code) };
        }
        1
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        // Callbacks OpenSSL makes while freeing the SSL must not touch the connection.
        self.detach();
    }
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("server", &self.is_server())
            .field("alpn", &self.alpn())
            .finish()
    }
}

fn alpn_list(wire: &[u8]) -> String {
    let names: Vec<_> = crate::config::wire_entries(wire)
        .map(String::from_utf8_lossy)
        .collect();
    format!("[{}]", names.join(", "))
}

/// Runs a callback body on the session behind `arg`, catching panics (recorded on the session).
///
/// # Safety
/// `arg` is the `*mut TlsSession` registered with `SSL_set_quic_tls_cbs`.
unsafe fn with_session(arg: *mut c_void, body: impl FnOnce(&mut TlsSession) -> c_int) -> c_int {
    // SAFETY: per the contract; the session is alive while its SSL is.
    let session = unsafe { &mut *(arg as *mut TlsSession) };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut *session))) {
        Ok(rv) => rv,
        Err(panic) => {
            session.record_panic(panic);
            0
        }
    }
}

unsafe extern "C" fn cb_crypto_send(
    _ssl: *mut ffi::SSL,
    buf: *const c_uchar,
    len: usize,
    consumed: *mut usize,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: OpenSSL passes `len` readable bytes and a writable `consumed`; arg is ours.
    unsafe {
        with_session(arg, |s| {
            s.crypto_send(std::slice::from_raw_parts(buf, len), &mut *consumed)
        })
    }
}

unsafe extern "C" fn cb_recv_rcd(
    _ssl: *mut ffi::SSL,
    buf: *mut *const c_uchar,
    bytes_read: *mut usize,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: writable out-pointers from OpenSSL; arg is ours.
    unsafe { with_session(arg, |s| s.recv_rcd(&mut *buf, &mut *bytes_read)) }
}

unsafe extern "C" fn cb_release_rcd(
    _ssl: *mut ffi::SSL,
    released: usize,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: arg is ours.
    unsafe { with_session(arg, |s| s.release_rcd(released)) }
}

unsafe extern "C" fn cb_yield_secret(
    _ssl: *mut ffi::SSL,
    level: u32,
    direction: c_int,
    secret: *const c_uchar,
    len: usize,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: OpenSSL passes `len` readable bytes; arg is ours.
    unsafe {
        with_session(arg, |s| {
            s.yield_secret(level, direction, std::slice::from_raw_parts(secret, len))
        })
    }
}

unsafe extern "C" fn cb_got_transport_params(
    _ssl: *mut ffi::SSL,
    params: *const c_uchar,
    len: usize,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: OpenSSL passes `len` readable bytes; arg is ours.
    unsafe {
        with_session(arg, |s| {
            let params = if len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(params, len)
            };
            s.got_transport_params(params)
        })
    }
}

unsafe extern "C" fn cb_alert(_ssl: *mut ffi::SSL, code: c_uchar, arg: *mut c_void) -> c_int {
    // SAFETY: arg is ours.
    unsafe { with_session(arg, |s| s.alert(code)) }
}

/// Casts a callback to the generic function type of an `OSSL_DISPATCH` entry.
macro_rules! dispatch {
    ($id:expr, $f:expr) => {
        OsslDispatch {
            function_id: $id,
            // SAFETY: OpenSSL casts the pointer back to the exact signature documented for `$id`
            // in core_dispatch.h, which `$f` has.
            function: Some(unsafe {
                std::mem::transmute::<*const (), unsafe extern "C" fn()>($f as *const ())
            }),
        }
    };
}

struct DispatchTable([OsslDispatch; 7]);
// SAFETY: the table holds only function pointers and integers, never mutated.
unsafe impl Sync for DispatchTable {}

impl DispatchTable {
    fn as_ptr(&self) -> *const OsslDispatch {
        self.0.as_ptr()
    }
}

static DISPATCH: DispatchTable = DispatchTable([
    dispatch!(OSSL_FUNC_SSL_QUIC_TLS_CRYPTO_SEND, cb_crypto_send),
    dispatch!(OSSL_FUNC_SSL_QUIC_TLS_CRYPTO_RECV_RCD, cb_recv_rcd),
    dispatch!(OSSL_FUNC_SSL_QUIC_TLS_CRYPTO_RELEASE_RCD, cb_release_rcd),
    dispatch!(OSSL_FUNC_SSL_QUIC_TLS_YIELD_SECRET, cb_yield_secret),
    dispatch!(
        OSSL_FUNC_SSL_QUIC_TLS_GOT_TRANSPORT_PARAMS,
        cb_got_transport_params
    ),
    dispatch!(OSSL_FUNC_SSL_QUIC_TLS_ALERT, cb_alert),
    OsslDispatch {
        function_id: 0,
        function: None,
    },
]);
