//! The overflow listener's responder. When every worker of a service is
//! overloaded, the steering program sends new connections to a listener the
//! supervisor holds in the same reuseport group; this answers the request
//! on each with a minimal 503 (`Retry-After`, `Connection: close`) from
//! Rust, without touching a worker, so clients and load balancers learn at
//! once to go elsewhere instead of queueing behind busy event loops.
//!
//! It runs when the machine is busiest, on the CPU the workers need, so it
//! does as little as it can: no HTTP parsing, one prepared response. It
//! waits for the request's first bytes (a client must not get an answer
//! before it asked), writes the response, ends its side of the connection,
//! and reads until the client closes, so that unread bytes never turn the
//! close into a reset that could destroy the answer.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Serves 503s on `listener` until the runtime ends.
pub async fn serve(
    listener: std::net::TcpListener,
    retry_after_secs: u64,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let answer: Arc<[u8]> = response(retry_after_secs).into();
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // The client gave up before we got to it, or no fds left for a
            // moment: the next connection may do better.
            Err(e) if transient(&e) => {
                if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE)
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let (answer, metrics) = (answer.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, reject(stream, &answer, &metrics)).await;
        });
    }
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

async fn reject(mut stream: TcpStream, answer: &[u8], metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    if stream.read(&mut buf).await? == 0 {
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
