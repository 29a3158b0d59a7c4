//! The protocol as a Talos node sees it: real server, real TLS, real gRPC client.

mod common;

use common::*;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use talos_kms_server::client::ClientError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::Code;

const LOCAL2: &str = "127.0.0.2";

#[tokio::test]
async fn seal_then_unseal_on_fresh_connections_returns_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();

    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(sealed.len(), 44, "Talos stores nonce (12) + key (32)");
    assert!(
        !sealed.windows(32).any(|w| w == passphrase),
        "the blob must not contain the passphrase"
    );
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    // And again: unseal is repeatable at every boot.
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_database_alone_does_not_hold_the_passphrase_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    server.running.shutdown().await.unwrap();

    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", dir.path().join("kms.db").display());
        bytes.extend(std::fs::read(path).unwrap_or_default());
    }
    assert!(
        bytes.windows(12).any(|w| w == &sealed[..12]),
        "the nonce is stored"
    );
    assert!(
        !bytes.windows(32).any(|w| w == &sealed[12..]),
        "the key must not be stored"
    );
    assert!(
        !bytes.windows(32).any(|w| w == passphrase),
        "the passphrase must not be stored"
    );
}

/// A failed unseal answers OK with 32 bytes that are not the passphrase, and differ
/// from one failure to the next.
async fn assert_refused(result: Result<Vec<u8>, ClientError>, passphrase: &[u8]) -> Vec<u8> {
    let answer = result.expect("a refused unseal still answers OK");
    assert_eq!(answer.len(), 32);
    assert_ne!(answer, passphrase);
    answer
}

#[tokio::test]
async fn wrong_node_uuid_gets_random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();

    let other = "313faf71-17a0-43d7-a88b-0afd96094178";
    let first = assert_refused(client.unseal(other, &sealed).await, &passphrase).await;
    let second = assert_refused(client.unseal(other, &sealed).await, &passphrase).await;
    assert_ne!(first, second, "decoys are random, not a fixed marker");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn wrong_source_address_gets_random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let node_a = server.client("127.0.0.1", Some("127.0.0.1".parse().unwrap()));
    let node_b = server.client("127.0.0.1", Some(LOCAL2.parse().unwrap()));
    let passphrase = random_passphrase();

    let sealed = node_a.seal(NODE, &passphrase).await.unwrap();
    assert_refused(node_b.unseal(NODE, &sealed).await, &passphrase).await;
    assert_eq!(node_a.unseal(NODE, &sealed).await.unwrap(), passphrase);

    // And the other way round: sealed from .2, only .2 unseals.
    let sealed = node_b.seal(NODE, &passphrase).await.unwrap();
    assert_refused(node_a.unseal(NODE, &sealed).await, &passphrase).await;
    assert_eq!(node_b.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_nonce_and_tampered_blobs_are_answered_like_wrong_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();

    let mut unknown_nonce = sealed.clone();
    unknown_nonce[0] ^= 0x01;
    let mut tampered_key = sealed.clone();
    tampered_key[43] ^= 0x80;
    let all_zero = vec![0u8; 44];
    for blob in [unknown_nonce, tampered_key, all_zero] {
        assert_refused(client.unseal(NODE, &blob).await, &passphrase).await;
    }
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let sealed = client.seal(NODE, &random_passphrase()).await.unwrap();

    let cases: Vec<(Result<Vec<u8>, ClientError>, &str)> = vec![
        (client.unseal(NODE, &sealed[..43]).await, "44-byte"),
        (
            client
                .unseal(NODE, &[sealed.clone(), vec![0]].concat())
                .await,
            "44-byte",
        ),
        (client.unseal(NODE, &[]).await, "44-byte"),
        (client.unseal("", &sealed).await, "node_uuid is empty"),
        (client.seal(NODE, &[]).await, "data is empty"),
        (client.seal(NODE, &[1u8; 257]).await, "at most 256"),
        (
            client.seal(&"u".repeat(256), &[1u8; 32]).await,
            "node_uuid is 256 bytes",
        ),
    ];
    for (result, reason) in cases {
        match result {
            Err(ClientError::Status(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(
                    status.message().contains(reason),
                    "{:?} lacks {reason:?}",
                    status.message()
                );
            }
            other => panic!("expected INVALID_ARGUMENT ({reason}), got {other:?}"),
        }
    }
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ipv4_clients_bind_the_same_address_text_on_a_dual_stack_listener() {
    let dir = tempfile::tempdir().unwrap();
    let passphrase = random_passphrase();

    // Seal through a dual-stack listener: the peer appears as ::ffff:127.0.0.1.
    let dual = TestServer::start(dir.path(), "[::]:0").await;
    let sealed = dual
        .client("127.0.0.1", None)
        .seal(NODE, &passphrase)
        .await
        .unwrap();
    dual.running.shutdown().await.unwrap();

    // Unseal through an IPv4-only listener on the same database.
    let v4 = TestServer::start(dir.path(), "127.0.0.1:0").await;
    assert_eq!(
        v4.client("127.0.0.1", None)
            .unseal(NODE, &sealed)
            .await
            .unwrap(),
        passphrase
    );
    v4.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn records_survive_a_restart_and_access_times_are_flushed_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let passphrase = random_passphrase();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();

    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let (uuid, ip, last_access): (String, String, Option<i64>) = db
        .query_row("SELECT node_uuid, ip, last_access FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((uuid.as_str(), ip.as_str()), (NODE, "127.0.0.1"));
    assert!(
        last_access.is_some(),
        "the unseal's access time is written at shutdown"
    );
    drop(db);

    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_seals_all_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = Arc::new(server.client("127.0.0.1", None));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let node = format!("node-{i}");
            let passphrase = random_passphrase();
            let sealed = client.seal(&node, &passphrase).await.unwrap();
            (node, passphrase, sealed)
        }));
    }
    for task in tasks {
        let (node, passphrase, sealed) = task.await.unwrap();
        assert_eq!(client.unseal(&node, &sealed).await.unwrap(), passphrase);
    }
    server.running.shutdown().await.unwrap();
}

/// On one connection, unseals are answered within the poll that reads them while seals wait
/// for their commit in tasks of their own: every answer must still reach its own call.
#[tokio::test]
async fn interleaved_seals_and_unseals_on_one_connection_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let connection = client.connect().await.unwrap();
    let mut sealed_before = Vec::new();
    for i in 0..32 {
        let node = format!("earlier-{i}");
        let passphrase = random_passphrase();
        let sealed = connection.clone().seal(&node, &passphrase).await.unwrap();
        sealed_before.push((node, passphrase, sealed));
    }
    let mut calls = tokio::task::JoinSet::new();
    for (i, (node, passphrase, sealed)) in sealed_before.into_iter().enumerate() {
        let mut unsealing = connection.clone();
        calls.spawn(async move {
            let answer = unsealing.unseal(&node, &sealed).await.unwrap();
            assert_eq!(
                answer, passphrase,
                "unseal of {node} got another call's answer"
            );
        });
        let mut sealing = connection.clone();
        calls.spawn(async move {
            let node = format!("later-{i}");
            let passphrase = random_passphrase();
            let sealed = sealing.seal(&node, &passphrase).await.unwrap();
            let answer = sealing.unseal(&node, &sealed).await.unwrap();
            assert_eq!(answer, passphrase, "seal then unseal of {node}");
        });
    }
    let mut finished = 0;
    while let Some(call) =
        tokio::time::timeout(std::time::Duration::from_secs(30), calls.join_next())
            .await
            .expect("every call is answered within 30 s")
    {
        call.unwrap();
        finished += 1;
    }
    assert_eq!(finished, 64);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ipv6_clients_are_bound_to_their_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "[::]:0").await;
    let v6 = server.client("::1", None);
    let v4 = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = v6.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(v6.unseal(NODE, &sealed).await.unwrap(), passphrase);
    assert_refused(v4.unseal(NODE, &sealed).await, &passphrase).await;
    server.running.shutdown().await.unwrap();

    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let ip: String = db
        .query_row("SELECT ip FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        ip, "0:0:0:0:0:0:0:1",
        "IPv6 in the legacy server's (Java's) text form"
    );
}

#[tokio::test]
async fn a_seal_from_127_0_0_2_is_recorded_with_that_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let source: IpAddr = LOCAL2.parse().unwrap();
    server
        .client("127.0.0.1", Some(source))
        .seal(NODE, &random_passphrase())
        .await
        .unwrap();
    server.running.shutdown().await.unwrap();
    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let ip: String = db
        .query_row("SELECT ip FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ip, LOCAL2);
}

/// A seal waits for its commit, and the server's HTTP/2 SETTINGS wait with it: its whole
/// reply leaves in as many TLS records as an unseal's, which is answered at once. A record
/// more is one more to encrypt, send, and have the client acknowledge.
#[tokio::test]
async fn a_seal_answers_in_as_few_tls_records_as_an_unseal() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let passphrase = random_passphrase();
    let request = |data: &[u8]| talos_kms_server::proto::Request {
        node_uuid: NODE.into(),
        data: data.to_vec(),
    };

    // A commit slower than the server's hold (a loaded machine) splits a reply: the least of
    // three seals counts.
    let mut seal_records = usize::MAX;
    let mut sealed = Vec::new();
    for _ in 0..3 {
        let (answer, records) = one_call_counting_records(
            server.port(),
            &server.pki.ca,
            talos_kms_server::proto::SEAL_PATH,
            &request(&passphrase).encode_to_vec(),
        )
        .await;
        sealed = talos_kms_server::proto::Response::decode(&answer[..])
            .unwrap()
            .data
            .clone();
        seal_records = seal_records.min(records);
    }
    let (unsealed, unseal_records) = one_call_counting_records(
        server.port(),
        &server.pki.ca,
        talos_kms_server::proto::UNSEAL_PATH,
        &request(&sealed).encode_to_vec(),
    )
    .await;
    let unsealed = talos_kms_server::proto::Response::decode(&unsealed[..])
        .unwrap()
        .data
        .clone();
    assert_eq!(
        unsealed, passphrase,
        "the raw calls seal and unseal for real"
    );
    assert_eq!(
        seal_records, unseal_records,
        "a seal's reply took more TLS records than an unseal's"
    );
    server.running.shutdown().await.unwrap();
}

/// Makes one call the way Talos does (its request leaves with the TLS Finished), and returns
/// the answer's message and how many TLS records reached the client after its request.
async fn one_call_counting_records(
    port: u16,
    ca: &std::path::Path,
    path: &str,
    message: &[u8],
) -> (Vec<u8>, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let (tcp, records) = RecordCounter::new(tcp);
    let mut tls = tokio_rustls::TlsConnector::from(client_tls(ca))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();

    let mut block = vec![0x83, 0x87]; // :method POST, :scheme https
    for (name_index, value) in [(4u8, path), (1, "127.0.0.1")] {
        block.extend([name_index, value.len() as u8]); // literal with an indexed name
        block.extend(value.as_bytes());
    }
    block.extend([0x0f, 0x10, 16]); // content-type (static index 31)
    block.extend(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend(b"te");
    block.push(8);
    block.extend(b"trailers");
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, &body)); // DATA, END_STREAM
    tls.write_all(&out).await.unwrap();
    records.start_counting();
    tls.get_mut().0.uncork();
    tls.flush().await.unwrap();

    let mut answer = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut header = [0u8; 9];
        tokio::time::timeout_at(deadline, tls.read_exact(&mut header))
            .await
            .expect("the answer within 10 s")
            .unwrap();
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; length];
        tls.read_exact(&mut payload).await.unwrap();
        if stream != 1 {
            continue;
        }
        match kind {
            0x0 => answer.extend(payload),
            0x1 if flags & 0x1 != 0 => break, // trailers
            0x3 | 0x7 => panic!("the call was reset"),
            _ => {}
        }
    }
    assert!(answer.len() > 5, "no answer");
    (answer[5..].to_vec(), records.counted())
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// A TCP stream that counts the TLS records it reads once told to, and holds its writes
/// from the server's first flight until uncorked, so that the client's Finished and its
/// request leave in one write.
struct RecordCounter {
    tcp: tokio::net::TcpStream,
    /// None until the server's first bytes arrive.
    corked: Option<bool>,
    held: Vec<u8>,
    counts: Arc<Counts>,
    /// The current record's header as far as it has been read, then its body left to skip.
    header: Vec<u8>,
    body_left: usize,
}

#[derive(Default)]
struct Counts {
    counting: AtomicBool,
    records: AtomicUsize,
}

struct CountHandle(Arc<Counts>);

impl CountHandle {
    fn start_counting(&self) {
        self.0.counting.store(true, Ordering::SeqCst);
    }

    fn counted(&self) -> usize {
        self.0.records.load(Ordering::SeqCst)
    }
}

impl RecordCounter {
    fn new(tcp: tokio::net::TcpStream) -> (RecordCounter, CountHandle) {
        let counts = Arc::new(Counts::default());
        let counter = RecordCounter {
            tcp,
            corked: None,
            held: Vec::new(),
            counts: Arc::clone(&counts),
            header: Vec::new(),
            body_left: 0,
        };
        (counter, CountHandle(counts))
    }

    /// What was held leaves with the next flush, and later writes go straight out.
    fn uncork(&mut self) {
        self.corked = Some(false);
    }

    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.held.is_empty() {
            let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held))?;
            self.held.drain(..written);
        }
        Poll::Ready(Ok(()))
    }

    fn count(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skipped = self.body_left.min(bytes.len());
                self.body_left -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let taken = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..taken]);
            bytes = &bytes[taken..];
            if self.header.len() == 5 {
                if self.header[0] == 23 && self.counts.counting.load(Ordering::SeqCst) {
                    self.counts.records.fetch_add(1, Ordering::SeqCst);
                }
                self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                self.header.clear();
            }
        }
    }
}

impl AsyncRead for RecordCounter {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        let read = buf.filled()[before..].to_vec();
        if !read.is_empty() && this.corked.is_none() {
            this.corked = Some(true);
        }
        this.count(&read);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordCounter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.corked == Some(true) {
            this.held.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.corked == Some(true) {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
