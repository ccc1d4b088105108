//! Connection admission and the header-read deadline (issue 13): what a client
//! without a secret can hold is bounded before any request reaches the router.
//!
//! - **Caps at accept.** [`Admission`] counts open connections, in total and
//!   per peer IP address, and closes one beyond `server.max_connections` or
//!   `server.max_connections_per_peer` as soon as it is accepted: no TLS
//!   handshake, no HTTP, one counter increment
//!   (`dcvv_connections_refused_total{reason}`).
//! - **Header-read deadline and keep-alive idle timeout.** A new connection
//!   must bring its first complete request head within
//!   `server.header_read_timeout_ms` of accept (the TLS handshake and HTTP
//!   version detection included). After a response, a connection with no
//!   request being served may stay idle for `server.keep_alive_timeout_ms`;
//!   once bytes arrive again, the request they start must be whole within
//!   `header_read_timeout_ms` of the first. Past either, it is closed. This
//!   holds for HTTP/1.1 and HTTP/2 alike because it is kept below both:
//!   [`Guarded`] wraps the TCP stream and [`Tracked`] the connection's
//!   service, which knows when requests start and end. (For HTTP/2 any frame
//!   the client sends while idle, a ping too, starts the header deadline.)
//!   A deadline is only ever judged while the stream would wait: data already
//!   received is read first, so a busy process does not cut a client that was
//!   on time.
//!
//! This module holds no request data and logs nothing about a peer but counts.
//! The body deadline and the in-flight limit live with the router ([`super::app`]).

use std::collections::HashMap;
use std::future::{Future, Ready, ready};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::settings::ServerSettings;

use super::metrics::Metrics;

/// Refusal reason label: the process-wide cap.
pub const REFUSED_MAX_CONNECTIONS: &str = "max_connections";
/// Refusal reason label: the per-peer cap.
pub const REFUSED_PER_PEER: &str = "max_connections_per_peer";

/// Sets hyper's own bounds. HTTP/1.1 `header_read_timeout`: hyper starts it
/// when it begins waiting for a head, that is at the start of an idle period,
/// so it can only bound idle time plus head, at `keep_alive_timeout` (a
/// backstop to [`Guarded`]). HTTP/2: at most `max_in_flight` concurrent streams
/// per connection, more than the in-flight limit could serve is pointless.
/// No HTTP/2 keep-alive pings: a dead peer's connection is already bounded by
/// the request timeout while busy and by the idle timeout after, and a ping's
/// answer would count as a new request's first bytes.
pub fn configure(builder: &mut Builder<TokioExecutor>, settings: &ServerSettings) {
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.keep_alive_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(u32::try_from(settings.max_in_flight).unwrap_or(u32::MAX));
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Limits {
    max_total: usize,
    max_per_peer: usize,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    open: Mutex<Open>,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// The counts; a panic elsewhere while holding the lock leaves them usable.
    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The axum-server acceptor that applies the caps and installs the deadline.
/// Put it innermost (under TLS), so that the handshake counts too.
#[derive(Debug, Clone)]
pub struct Admission(Arc<Limits>);

impl Admission {
    /// An acceptor for `settings`' caps and deadline, counting into `metrics`.
    pub fn new(settings: &ServerSettings, metrics: Arc<Metrics>) -> Self {
        Admission(Arc::new(Limits {
            max_total: settings.max_connections,
            max_per_peer: settings.max_connections_per_peer,
            header_read_timeout: settings.header_read_timeout,
            keep_alive_timeout: settings.keep_alive_timeout,
            open: Mutex::new(Open::default()),
            metrics,
        }))
    }

    /// Takes a connection slot for `peer`, or says which cap refused it.
    fn admit(&self, peer: IpAddr) -> Result<Slot, &'static str> {
        let mut open = self.0.open();
        if open.total >= self.0.max_total {
            return Err(REFUSED_MAX_CONNECTIONS);
        }
        let from_peer = open.per_peer.entry(peer).or_insert(0);
        if *from_peer >= self.0.max_per_peer {
            return Err(REFUSED_PER_PEER);
        }
        *from_peer += 1;
        open.total += 1;
        drop(open);
        self.0.metrics.connection_open(1);
        Ok(Slot {
            limits: Arc::clone(&self.0),
            peer,
        })
    }
}

impl<S> Accept<TcpStream, S> for Admission {
    type Stream = Guarded<TcpStream>;
    type Service = Tracked<S>;
    type Future = Ready<io::Result<(Guarded<TcpStream>, Tracked<S>)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let peer = match stream.peer_addr() {
            Ok(address) => address.ip(),
            Err(e) => return ready(Err(e)),
        };
        let slot = match self.admit(peer) {
            Ok(slot) => slot,
            Err(reason) => {
                self.0.metrics.connection_refused(reason);
                // Dropping the stream closes it: nothing more is spent on it.
                drop(stream);
                return ready(Err(io::Error::other(reason)));
            }
        };
        let accepted = Instant::now();
        let activity = Arc::new(Activity {
            busy: AtomicUsize::new(0),
            idle_since: Mutex::new(accepted),
        });
        let deadline = accepted + self.0.header_read_timeout;
        ready(Ok((
            Guarded {
                inner: stream,
                activity: Arc::clone(&activity),
                header_read_timeout: self.0.header_read_timeout,
                keep_alive_timeout: self.0.keep_alive_timeout,
                accepted,
                seen_idle_since: accepted,
                first_byte: None,
                sleep: Box::pin(tokio::time::sleep_until(deadline)),
                timed_out: false,
                slot,
            },
            Tracked {
                inner: service,
                activity,
            },
        )))
    }
}

/// One admitted connection's place in the counts, given back on drop.
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
        drop(open);
        self.limits.metrics.connection_open(-1);
    }
}

/// Requests of one connection being served, and since when it has had none.
#[derive(Debug)]
struct Activity {
    busy: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn idle_since(&self) -> MutexGuard<'_, Instant> {
        self.idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by a request while it is served: the connection is not idle.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::SeqCst);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The time first: a stream that sees no request busy sees this end.
        *self.0.idle_since() = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's service: marks the connection busy while a request is served
/// (for HTTP/2, while any of its streams is).
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R> tower::Service<R> for Tracked<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let busy = Busy::new(Arc::clone(&self.activity));
        let served = self.inner.call(request);
        Box::pin(async move {
            let response = served.await;
            drop(busy);
            response
        })
    }
}

/// A connection's stream: fails a read or write that would wait past the
/// connection's deadline while no request is being served, which closes it.
#[derive(Debug)]
pub struct Guarded<IO> {
    inner: IO,
    activity: Arc<Activity>,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    accepted: Instant,
    /// The end of the last request as last seen; a change means a new idle period.
    seen_idle_since: Instant,
    /// When the first byte of this idle period arrived (a new request starting).
    first_byte: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    timed_out: bool,
    slot: Slot,
}

impl<IO> Guarded<IO> {
    /// The deadline now, or `None` while a request is being served.
    fn deadline(&mut self) -> Option<Instant> {
        if self.activity.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let idle_since = *self.activity.idle_since();
        if idle_since != self.seen_idle_since {
            self.seen_idle_since = idle_since;
            self.first_byte = None;
        }
        if idle_since == self.accepted {
            return Some(self.accepted + self.header_read_timeout);
        }
        let idle_until = idle_since + self.keep_alive_timeout;
        Some(match self.first_byte {
            Some(first) => idle_until.min(first + self.header_read_timeout),
            None => idle_until,
        })
    }

    /// Bytes arrived: while idle, the first of them starts the header deadline.
    fn received(&mut self) {
        if self.deadline().is_some() && self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
    }

    /// Called when the stream would wait: `Some(error)` once the deadline has
    /// passed; otherwise arms the timer so this task wakes at the deadline.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let deadline = self.deadline()?;
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        if !self.timed_out {
            self.timed_out = true;
            self.slot.limits.metrics.connection_timed_out();
        }
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            "no complete request within server.header_read_timeout_ms or \
             server.keep_alive_timeout_ms",
        ))
    }

    /// `waiting` unless the deadline has passed.
    fn or_expired<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.expired(cx) {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => self.or_expired(cx),
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.received();
                Poll::Ready(Ok(()))
            }
            done => done,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.or_expired(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.or_expired(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.or_expired(cx),
            done => done,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_total: usize, max_per_peer: usize) -> ServerSettings {
        ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            transport: crate::http::settings::Transport::InsecureHttp,
            request_timeout: Duration::from_secs(10),
            body_limit: 16 * 1024,
            max_in_flight: 4,
            shutdown_grace: Duration::from_secs(1),
            max_skew: Duration::from_secs(300),
            cleanup_interval: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(5),
            max_connections: max_total,
            max_connections_per_peer: max_per_peer,
            worker_threads: 1,
        }
    }

    #[test]
    fn caps_refuse_by_kind_and_slots_come_back_on_drop() {
        let admission = Admission::new(&settings(3, 2), Arc::new(Metrics::new()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), REFUSED_PER_PEER);
        let _third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), REFUSED_MAX_CONNECTIONS);
        drop(first);
        let _again = admission.admit(a).unwrap();
        assert_eq!(admission.0.open().total, 3);
    }
}
