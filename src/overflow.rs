//! The overflow listener's responder. When every worker of a service is
//! overloaded, the steering program sends new connections to a listener the
//! supervisor holds in the same reuseport group; this answers each request
//! on them with a minimal 503 (`Retry-After`, `Connection: close`) from
//! Rust, without touching a worker, so clients and load balancers learn at
//! once to go elsewhere instead of queueing behind busy event loops.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::telemetry::metrics::Metrics;

struct Overflow {
    retry_after: HeaderValue,
    metrics: Arc<Metrics>,
}

/// Serves 503s on `listener` until the runtime ends.
pub async fn serve(
    listener: std::net::TcpListener,
    retry_after_secs: u64,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let state = Arc::new(Overflow {
        retry_after: HeaderValue::from(retry_after_secs.max(1)),
        metrics,
    });
    let app = Router::new().fallback(reject).with_state(state);
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, app).await
}

async fn reject(State(state): State<Arc<Overflow>>) -> Response {
    state.metrics.count_overflow();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::RETRY_AFTER, state.retry_after.clone()),
            (header::CONNECTION, HeaderValue::from_static("close")),
            (header::CONTENT_TYPE, HeaderValue::from_static("text/plain")),
        ],
        "overloaded\n",
    )
        .into_response()
}
