//! The overflow listener's responder. When every worker of a service is
//! overloaded, the steering program sends new connections to a listener the
//! supervisor holds in the same reuseport group; this answers the request
//! on each with a minimal 503 (`Retry-After`, `Connection: close`) from
//! Rust, without touching a worker, so clients and load balancers learn at
//! once to go elsewhere instead of queueing behind busy event loops.
//!
//! It runs when the machine is busiest, on the CPU the workers need, so it
//! does as little as it can: no HTTP parsing, one prepared response. It
//! answers only after the request's first bytes (a client must not get an
//! answer before it asked). Usually the whole request is in by the time the
//! connection is accepted: then it is answered right in the accept loop,
//! with the end of the connection in the same segment as the response, and
//! closed, with no task, no wait for readiness and no wake-up for the
//! client's close. Otherwise (the request not yet in, or one with a body) a
//! task waits for it, writes, ends its side, and reads until the client
//! closes, so that unread bytes never turn the close into a reset that
//! could destroy the answer.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use std::io::Read;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::telemetry::metrics::Metrics;

/// How long a client may take to send its request, and to close after the
/// answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The whole response, head and body.
fn response(retry_after_secs: u64) -> Vec<u8> {
    let body = "overloaded\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: {}\r\nconnection: close\r\n\
         content-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        retry_after_secs.max(1),
        body.len()
    )
    .into_bytes()
}

/// How long the accept loop rests after taking every waiting connection.
/// Connections then come in small batches instead of one wake-up each,
/// each of which would take the CPU from a busy worker; a 503 comes at most
/// this much later.
const BATCH: Duration = Duration::from_millis(2);

/// Serves 503s on `listener` until the runtime ends. `retry_after_secs`:
/// `[overload] retry_after`, which a reload may change.
pub async fn serve(
    listener: std::net::TcpListener,
    mut retry_after_secs: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let mut answer: Arc<[u8]> = response(*retry_after_secs.borrow_and_update()).into();
    listener.set_nonblocking(true)?;
    let listener = watch_fd(listener)?;
    loop {
        let mut ready = listener.readable().await?;
        if retry_after_secs.has_changed().unwrap_or(false) {
            answer = response(*retry_after_secs.borrow_and_update()).into();
        }
        let mut rest = BATCH;
        loop {
            let stream = match ready.get_inner().accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                // The client gave up before we got to it, or no fds left for
                // a moment: the next connection may do better.
                Err(e) if transient(&e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        // No fds: the connections wait in the queue a little
                        // longer rather than spin on this error.
                        rest = Duration::from_millis(10);
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Answered here when the request is in; the rest get a task.
            let asked = match stream.set_nonblocking(true) {
                Ok(()) => match answer_now(&stream, &answer, &metrics) {
                    Quick::Done => continue,
                    Quick::NotYet => false,
                    Quick::Asked => true,
                },
                Err(_) => continue,
            };
            let Ok(stream) = TcpStream::from_std(stream) else {
                continue;
            };
            let (answer, metrics) = (answer.clone(), metrics.clone());
            tokio::spawn(async move {
                let answering = reject(stream, asked, &answer, &metrics);
                let _ = tokio::time::timeout(CLIENT_TIMEOUT, answering).await;
            });
        }
        drop(ready);
        tokio::time::sleep(rest).await;
    }
}

/// Registers the listener with the runtime, to wait for connections and
/// take them with plain `accept` calls (no registration per connection).
fn watch_fd(listener: std::net::TcpListener) -> std::io::Result<AsyncFd<std::net::TcpListener>> {
    // SAFETY: the AsyncFd owns the listener, so its file descriptor stays
    // open, and the same one, for as long as the AsyncFd lives.
    unsafe { AsyncFd::register(listener) }.map_err(std::io::Error::from)
}

fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// What [`answer_now`] did.
enum Quick {
    /// Answered and closed, or the client had gone.
    Done,
    /// Nothing to read yet.
    NotYet,
    /// The client asked, but more may follow (a body, a head in pieces).
    Asked,
}

/// Answers a connection whose whole request (a head without a body) is
/// already in, without waiting for anything.
fn answer_now(stream: &std::net::TcpStream, answer: &[u8], metrics: &Metrics) -> Quick {
    let mut buf = [0u8; 4096];
    let n = match (&*stream).read(&mut buf) {
        Ok(0) => return Quick::Done,
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => return Quick::NotYet,
        Err(_) => return Quick::Done,
    };
    if !complete_without_body(&buf[..n]) {
        return Quick::Asked;
    }
    metrics.count_overflow();
    let sock = socket2::SockRef::from(stream);
    // MSG_MORE holds the response back until the shutdown below adds the
    // FIN to it: one segment for the client to take in.
    match sock.send_with_flags(answer, libc::MSG_MORE) {
        Ok(sent) if sent == answer.len() => {
            let _ = sock.shutdown(std::net::Shutdown::Write);
        }
        // A fresh connection's send buffer always takes 150 bytes; if it
        // did not, the client gets no answer rather than half of one.
        _ => {}
    }
    Quick::Done
}

/// Whether `bytes` are a whole request head with no body to follow: they
/// end the head, and name no content length or transfer coding.
fn complete_without_body(bytes: &[u8]) -> bool {
    if !bytes.ends_with(b"\r\n\r\n") {
        return false;
    }
    let lower = bytes.to_ascii_lowercase();
    let has = |name: &[u8]| lower.windows(name.len()).any(|w| w == name);
    !has(b"\ncontent-length:") && !has(b"\ntransfer-encoding:")
}

/// The slow path: waits for the request's first bytes unless `asked`,
/// answers, and drains until the client closes.
async fn reject(
    mut stream: TcpStream,
    asked: bool,
    answer: &[u8],
    metrics: &Metrics,
) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    if !asked && stream.read(&mut buf).await? == 0 {
        return Ok(());
    }
    metrics.count_overflow();
    stream.write_all(answer).await?;
    stream.shutdown().await?;
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_head_without_a_body_is_answered_at_once() {
        assert!(complete_without_body(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!complete_without_body(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!complete_without_body(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(!complete_without_body(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
    }

    #[test]
    fn the_response_is_a_complete_503() {
        let text = String::from_utf8(response(0)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains("\r\nretry-after: 1\r\n"));
        assert!(head.contains("\r\nconnection: close\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        assert!(
            String::from_utf8(response(7))
                .unwrap()
                .contains("retry-after: 7\r\n")
        );
    }
}
