//! Issue 13: slow and unauthenticated clients cannot hold the gateway. Real
//! sockets on port 0 against a real gateway (SoftHSM token, SQLite, audit
//! trail): a connection that never sends, one that trickles its headers and
//! one that trickles its body are each closed or answered within their
//! deadline (+1 s), and so is an idle keep-alive connection; signed requests are served while 64 unsigned slow bodies
//! are held open; the connection caps refuse the N+1st connection, accept
//! again once one closes, and count each refusal by kind.
//!
//! Deadlines are short here so that no test waits longer than its deadline
//! plus a margin. Each test prints its measured timings (`--no-capture`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dcvv_gateway::domain::service::Clock as _;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::http::{Options, TestGateway, card, self_signed_tls};
use crate::support::routes::{ENQUIRY, HEALTHZ};

/// What "within its deadline" allows on top of the deadline.
const MARGIN: Duration = Duration::from_secs(1);

fn address(gw: &TestGateway) -> SocketAddr {
    gw.url.trim_start_matches("http://").parse().unwrap()
}

/// A TCP connection to the gateway from `local` (any 127.0.0.0/8 address is
/// this host), so that the per-peer cap can be told from the global one.
async fn connect_from(gw: &TestGateway, local: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(address(gw)).await.unwrap()
}

/// Reads until the gateway closes the connection (end of stream or reset);
/// fails the test if that takes longer than `limit`. Returns what was read.
async fn read_until_closed<R: AsyncRead + Unpin>(stream: &mut R, limit: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection was still open after {limit:?}; read so far: {:?}",
        String::from_utf8_lossy(&seen)
    );
    seen
}

/// The value of one metric line of the exposition, e.g.
/// `dcvv_connections_refused_total{reason="max_connections"}`.
fn metric(gw: &TestGateway, line: &str) -> Option<f64> {
    let text = gw.state.metrics().encode().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (up to 5 s) until a metric has a value.
async fn wait_for_metric(gw: &TestGateway, line: &str, value: f64) {
    let started = Instant::now();
    while metric(gw, line) != Some(value) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{line} is {:?}, expected {value}",
            metric(gw, line)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The head of a request whose signature headers are well formed and fresh
/// but whose MAC is all zeros: what an attacker without a secret can send.
fn unsigned_head(gw: &TestGateway, content_length: usize) -> String {
    use base64::Engine as _;
    let zero_mac = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
    format!(
        "POST {ENQUIRY} HTTP/1.1\r\nhost: localhost\r\napikey: anything\r\n\
         timestamp: {}\r\nx-client-request-id: r1\r\nsignature: {zero_mac}\r\n\
         content-type: application/json\r\ncontent-length: {content_length}\r\n\r\n",
        gw.clock.now_ms()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_is_closed_at_the_header_deadline() {
    let deadline = Duration::from_secs(1);
    let gw = TestGateway::start(Options {
        header_read_timeout: deadline,
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(address(&gw)).await.unwrap();
    let seen = read_until_closed(&mut silent, deadline + MARGIN).await;
    let took = started.elapsed();
    eprintln!("never-sending connection closed after {took:?} (deadline {deadline:?})");
    assert!(seen.is_empty(), "{:?}", String::from_utf8_lossy(&seen));
    assert!(
        took >= deadline - Duration::from_millis(100),
        "closed before its deadline: {took:?}"
    );
    wait_for_metric(&gw, "dcvv_connections_timed_out_total", 1.0).await;
    wait_for_metric(&gw, "dcvv_connections_open", 0.0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_are_cut_at_the_header_deadline() {
    let deadline = Duration::from_secs(1);
    let gw = TestGateway::start(Options {
        header_read_timeout: deadline,
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let stream = TcpStream::connect(address(&gw)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // One byte every 100 ms, never ending the headers.
    let trickle = tokio::spawn(async move {
        let head = format!("POST {ENQUIRY} HTTP/1.1\r\nhost: localhost\r\nx-slow: ");
        for byte in head.bytes().chain(std::iter::repeat(b'z')) {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    read_until_closed(&mut reader, deadline + MARGIN).await;
    let took = started.elapsed();
    eprintln!("header-trickling connection closed after {took:?} (deadline {deadline:?})");
    assert!(
        took >= deadline - Duration::from_millis(100),
        "closed before its deadline: {took:?}"
    );
    trickle.abort();
    wait_for_metric(&gw, "dcvv_connections_open", 0.0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408_at_the_body_deadline() {
    let deadline = Duration::from_secs(1);
    let gw = TestGateway::start(Options {
        body_read_timeout: deadline,
        ..Options::default()
    })
    .await;
    let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
    stream
        .write_all(unsigned_head(&gw, 1000).as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..999 {
            if writer.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(deadline + MARGIN, async {
        while !String::from_utf8_lossy(&answer).contains("body_timeout") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    eprintln!("body-trickling request answered after {took:?} (deadline {deadline:?})");
    assert!(read.is_ok(), "no answer after {took:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"body_timeout\""), "{text}");
    assert!(!text.contains("signature:"), "refused unsigned: {text}");
    assert!(
        took >= deadline - Duration::from_millis(100),
        "answered before its deadline: {took:?}"
    );
    trickle.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_are_served_while_64_slow_unsigned_bodies_are_held() {
    // The committed in-flight limit; deadlines long enough that the slow
    // bodies are still held when the signed requests are done.
    let deadline = Duration::from_secs(8);
    let gw = TestGateway::start(Options {
        max_in_flight: 32,
        header_read_timeout: deadline,
        body_read_timeout: deadline,
        ..Options::default()
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
        stream
            .write_all(unsigned_head(&gw, 1000).as_bytes())
            .await
            .unwrap();
        stream.write_all(b"{").await.unwrap();
        slow.push((stream, Instant::now()));
    }
    // All 64 are inside the router, waiting for their bodies.
    wait_for_metric(&gw, "dcvv_http_in_flight", 64.0).await;

    let started = Instant::now();
    let body = card(json!({}));
    for i in 0..100 {
        let answer = gw.call("POST", ENQUIRY, &body).await;
        assert_eq!(
            answer.status,
            200,
            "signed request {i}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let served_in = started.elapsed();
    eprintln!("100 signed requests served in {served_in:?} beside 64 slow bodies");

    // The slow bodies were still held all along: none has been answered yet.
    let mut buf = [0u8; 1];
    for (i, (stream, _)) in slow.iter_mut().enumerate() {
        match stream.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!(
                "slow connection {i} was answered or closed before the 100 signed \
                 requests were done ({served_in:?}): {other:?}"
            ),
        }
    }
    // Then each gets its 408 within the body deadline (+1 s).
    let mut slowest = Duration::ZERO;
    for (i, (stream, since)) in slow.iter_mut().enumerate() {
        let left = (deadline + MARGIN).saturating_sub(since.elapsed());
        let seen = read_until_closed(stream, left).await;
        let text = String::from_utf8_lossy(&seen);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "slow connection {i}: {text}"
        );
        slowest = slowest.max(since.elapsed());
    }
    eprintln!(
        "64 slow bodies answered 408 and closed, the last after {slowest:?} (deadline {deadline:?})"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_the_next_connection_and_accept_again() {
    let gw = TestGateway::start(Options {
        max_connections: 3,
        max_connections_per_peer: 2,
        header_read_timeout: Duration::from_secs(4),
        ..Options::default()
    })
    .await;
    let healthz = format!("GET {HEALTHZ} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    let healthz = healthz.as_bytes();
    let is_served = |mut stream: TcpStream| async move {
        stream.write_all(healthz).await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(MARGIN, stream.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        stream
    };
    let refused = |mut stream: TcpStream| async move {
        let started = Instant::now();
        let seen = read_until_closed(&mut stream, MARGIN).await;
        assert!(seen.is_empty());
        started.elapsed()
    };

    let a1 = is_served(connect_from(&gw, "127.0.0.1").await).await;
    let _a2 = is_served(connect_from(&gw, "127.0.0.1").await).await;
    let took = refused(connect_from(&gw, "127.0.0.1").await).await;
    eprintln!("third connection from one peer closed after {took:?}");
    let _b1 = is_served(connect_from(&gw, "127.0.0.2").await).await;
    let took = refused(connect_from(&gw, "127.0.0.3").await).await;
    eprintln!("fourth connection overall closed after {took:?}");
    assert_eq!(
        metric(
            &gw,
            "dcvv_connections_refused_total{reason=\"max_connections_per_peer\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            "dcvv_connections_refused_total{reason=\"max_connections\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&gw, "dcvv_connections_open"), Some(3.0));

    // One closes: its peer may connect again.
    drop(a1);
    wait_for_metric(&gw, "dcvv_connections_open", 2.0).await;
    let _a3 = is_served(connect_from(&gw, "127.0.0.1").await).await;
    assert_eq!(metric(&gw, "dcvv_connections_open"), Some(3.0));
    // And the caps still hold.
    refused(connect_from(&gw, "127.0.0.4").await).await;
    assert_eq!(
        metric(
            &gw,
            "dcvv_connections_refused_total{reason=\"max_connections\"}"
        ),
        Some(2.0)
    );
    gw.stop().await;
}

/// Sends `GET /healthz` and reads until the end of the response head.
async fn healthz_on(stream: &mut TcpStream) {
    stream
        .write_all(format!("GET {HEALTHZ} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(MARGIN, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_and_a_late_head_has_the_header_deadline() {
    let header = Duration::from_secs(1);
    let keep_alive = Duration::from_secs(4);
    let gw = TestGateway::start(Options {
        header_read_timeout: header,
        keep_alive_timeout: keep_alive,
        ..Options::default()
    })
    .await;
    let idle = async {
        let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
        healthz_on(&mut stream).await;
        let answered = Instant::now();
        read_until_closed(&mut stream, keep_alive + MARGIN).await;
        let took = answered.elapsed();
        eprintln!(
            "idle keep-alive connection closed {took:?} after its response (keep-alive {keep_alive:?})"
        );
        assert!(
            took >= keep_alive - Duration::from_millis(100),
            "an idle connection has the keep-alive timeout, not the header deadline: {took:?}"
        );
    };
    let late = async {
        let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
        healthz_on(&mut stream).await;
        let (mut reader, mut writer) = stream.into_split();
        // Idle for a while (within the keep-alive timeout), then a trickled head.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            let head = format!("POST {ENQUIRY} HTTP/1.1\r\nhost: localhost\r\nx-slow: ");
            for byte in head.bytes().chain(std::iter::repeat(b'z')) {
                if writer.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        read_until_closed(&mut reader, header + MARGIN).await;
        let took = started.elapsed();
        eprintln!(
            "head trickled after idling closed {took:?} after its first byte (deadline {header:?})"
        );
        assert!(took >= header - Duration::from_millis(100), "{took:?}");
        trickle.abort();
    };
    tokio::join!(idle, late);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_silent_after_its_handshake_is_closed_at_the_header_deadline() {
    // The attack of issue 13, over HTTPS: the handshake completes, then nothing.
    let deadline = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = self_signed_tls(dir.path());
    let gw = TestGateway::start(Options {
        tls: Some((cert_path, key_path)),
        header_read_timeout: deadline,
        ..Options::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let address: SocketAddr = gw.url.trim_start_matches("https://").parse().unwrap();
    let started = Instant::now();
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let handshake = started.elapsed();
    read_until_closed(&mut tls, deadline + MARGIN).await;
    let took = started.elapsed();
    eprintln!(
        "TLS connection silent after its handshake ({handshake:?}) closed after {took:?} (deadline {deadline:?})"
    );
    assert!(took >= deadline - Duration::from_millis(100), "{took:?}");
    wait_for_metric(&gw, "dcvv_connections_timed_out_total", 1.0).await;
    gw.stop().await;
}

/// The header deadline holds for HTTP/2 too: a client that opens an HTTP/2
/// connection (prior knowledge: the connection preface and an empty SETTINGS
/// frame) and then never sends a request's HEADERS is cut at the deadline,
/// after the gateway's own SETTINGS came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_never_sends_a_request_is_closed_at_the_header_deadline() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x04, 0, 0, 0, 0, 0];
    let deadline = Duration::from_secs(1);
    let gw = TestGateway::start(Options {
        header_read_timeout: deadline,
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&EMPTY_SETTINGS).await.unwrap();
    let seen = read_until_closed(&mut stream, deadline + MARGIN).await;
    let took = started.elapsed();
    eprintln!("silent HTTP/2 connection closed after {took:?} (deadline {deadline:?})");
    // The gateway spoke HTTP/2: its first frame is its SETTINGS (type 0x04).
    assert!(seen.len() >= 9 && seen[3] == 0x04, "{seen:02x?}");
    assert!(
        took >= deadline - Duration::from_millis(100),
        "closed before its deadline: {took:?}"
    );
    wait_for_metric(&gw, "dcvv_connections_timed_out_total", 1.0).await;
    wait_for_metric(&gw, "dcvv_connections_open", 0.0).await;
    gw.stop().await;
}
