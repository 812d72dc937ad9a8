//! The Prometheus endpoint: `GET /metrics` (text format 0.0.4) and `GET /health`
//! on a plain HTTP/1.1 listener of its own, so scraping never competes with gRPC.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::filter::FilterSet;
use crate::server::hub::HubStats;
use crate::storage::Store;

/// What the endpoint reports.
#[derive(Debug, Clone)]
pub struct MetricsSource {
    pub store: Store,
    pub hub: Arc<HubStats>,
    pub filters: Arc<FilterSet>,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The metrics in Prometheus text format.
pub fn render(source: &MetricsSource) -> String {
    let s = source.store.stats();
    let hub = &source.hub;
    let mut out = String::new();
    metric(
        &mut out,
        "switchyard_records_appended_total",
        "counter",
        "Records appended.",
        s.records_appended,
    );
    metric(
        &mut out,
        "switchyard_bytes_appended_total",
        "counter",
        "Bytes appended, framing included.",
        s.bytes_appended,
    );
    metric(
        &mut out,
        "switchyard_topics",
        "gauge",
        "Topics holding records.",
        s.topics,
    );
    metric(
        &mut out,
        "switchyard_segment_bytes",
        "gauge",
        "Bytes of segment files on disk.",
        s.segment_bytes,
    );
    metric(
        &mut out,
        "switchyard_fsyncs_total",
        "counter",
        "Syncs of segment data.",
        s.fsyncs,
    );
    metric(
        &mut out,
        "switchyard_fsync_seconds_total",
        "counter",
        "Time spent in syncs (divide by switchyard_fsyncs_total for the mean).",
        s.fsync_nanos as f64 / 1e9,
    );
    metric(
        &mut out,
        "switchyard_crc_errors_total",
        "counter",
        "Frames that failed their checks (recovery and reads).",
        s.crc_errors,
    );
    metric(
        &mut out,
        "switchyard_truncated_bytes_total",
        "counter",
        "Bytes cut from torn segment tails at recovery.",
        s.truncated_bytes,
    );
    metric(
        &mut out,
        "switchyard_segments_dropped_total",
        "counter",
        "Segments deleted by retention.",
        s.segments_dropped,
    );
    metric(
        &mut out,
        "switchyard_topics_expired_total",
        "counter",
        "Topics whose whole history aged out.",
        s.topics_expired,
    );
    metric(
        &mut out,
        "switchyard_subscriptions",
        "gauge",
        "Live subscriptions.",
        hub.subscriptions.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "switchyard_subscriber_streams",
        "gauge",
        "Open Subscribe streams.",
        hub.streams.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "switchyard_deliveries_total",
        "counter",
        "Live deliveries queued to streams (one per record per stream).",
        hub.deliveries.load(Ordering::Relaxed),
    );
    for (name, help, pick) in [
        ("switchyard_filter_evaluations_total", "Filter calls.", 0),
        (
            "switchyard_filter_denials_total",
            "Filter calls that withheld a record.",
            1,
        ),
        (
            "switchyard_filter_errors_total",
            "Filter calls that failed (record withheld).",
            2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (filter, stats) in source.filters.stats() {
            let value =
                [&stats.evaluations, &stats.denials, &stats.errors][pick].load(Ordering::Relaxed);
            let label = filter
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(out, "{name}{{filter=\"{label}\"}} {value}");
        }
    }
    metric(
        &mut out,
        "switchyard_slow_consumer_cutoffs_total",
        "counter",
        "Streams cut off for letting too many bytes pile up.",
        hub.slow_consumer_cutoffs.load(Ordering::Relaxed),
    );
    out
}

/// Answers one request: the path decides.
async fn answer(mut socket: TcpStream, source: MetricsSource) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0u8; 512];
    // Read the request head (bounded: 8 KiB).
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = socket.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buffer[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(&source)),
        "/health" => ("200 OK", "text/plain", "SERVING\n".to_owned()),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

/// Serves metrics on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    source: MetricsSource,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(address = ?listener.local_addr().ok(), "serving metrics");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    let source = source.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(socket, source).await {
                            tracing::debug!(%error, "metrics request failed");
                        }
                    });
                }
                Err(error) => tracing::warn!(%error, "accepting a metrics connection failed"),
            },
            () = &mut shutdown => return,
        }
    }
}
