//! HTTP/1.1 client side, with hyper: the CLI's calls to a runtime's admin
//! socket, and the single request `inject` sends to a service.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{InjectRequest, InjectResponse};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the runtime closed the connection: {0}")]
    Http(String),
}

/// A complete answer of the admin API.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    /// The `error` field of a JSON error body, or the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

async fn send<S>(
    io: S,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<Bytes>,
) -> Result<hyper::Response<Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}

async fn connect(socket: &Path) -> Result<tokio::net::UnixStream, ClientError> {
    tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })
}

/// One call to the admin API; the whole answer.
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Reply, ClientError> {
    let io = connect(socket).await?;
    let headers = match body {
        Some(_) => vec![(CONTENT_TYPE.to_string(), "application/json".to_owned())],
        None => Vec::new(),
    };
    let body = body.map(|b| Bytes::from(b.to_string()));
    let res = send(io, method, "ampere", path, &headers, body)
        .await
        .map_err(ClientError::Http)?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    Ok(Reply { status, body })
}

/// A streaming GET: `each` sees every piece of the body as it arrives,
/// until the runtime ends the stream or `each` returns false.
pub async fn follow(
    socket: &Path,
    path: &str,
    mut each: impl FnMut(&[u8]) -> bool,
) -> Result<u16, ClientError> {
    let io = connect(socket).await?;
    let res = send(io, "GET", "ampere", path, &[], None)
        .await
        .map_err(ClientError::Http)?;
    let status = res.status().as_u16();
    let mut body = res.into_body();
    while let Some(frame) = body.frame().await {
        // The runtime ends the stream when it stops: that is the end of
        // what there is to follow, not a failure.
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref()
            && !each(data)
        {
            break;
        }
    }
    Ok(status)
}

/// One HTTP request to `addr` (inject), with the whole response.
pub async fn http(addr: SocketAddr, req: &InjectRequest) -> Result<InjectResponse, String> {
    let io = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let host = addr.to_string();
    let body = req.body.clone().map(Bytes::from);
    let res = send(io, &req.method, &host, &req.path, &headers, body).await?;
    let status = res.status().as_u16();
    let headers = res
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(InjectResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
