//! The log stream: every worker's stdout and stderr and the supervisor's own
//! events, as one stream on ampere's stdout.
//!
//! JSON mode writes one pino-compatible object per line (`level` as pino's
//! number, `time` in epoch milliseconds, `msg`). A worker line that is
//! already a JSON object (pino, bunyan) passes through with `service`,
//! `worker` and `pid` added; any other line is wrapped, at level 30 (info) for
//! stdout and 50 (error) for stderr. Nothing is lost: a line longer than
//! [`MAX_CHUNK`] is written in pieces marked `"partial": true`, a last line
//! without a newline is written at end of file, and bytes that are not UTF-8
//! are kept in `msg_base64` next to a lossy `msg`. Pretty mode renders the
//! same records for people.
//!
//! A dedicated thread writes to stdout, so a slow terminal or pipe never
//! stalls the supervisor's event loop; the queue to it is bounded, so worker
//! output is slowed down to what stdout takes instead of piling up here.
//! Supervisor events never wait: one that finds the queue full is dropped,
//! counted, and reported once there is room. A write that stdout holds up
//! is timed ([`Stall`]), counted in the metrics and reported once it ends.
//!
//! The writer also keeps the last [`RECENT`] records and feeds live
//! subscribers ([`Tap`]), for `ampere logs` through the admin API.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::de::IgnoredAny;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead};

use crate::config::{LogFormat, LogLevel, LoggerConfig};

/// Longest piece of a line written as one record.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Records waiting for stdout before producers wait.
const QUEUE: usize = 4096;
/// Records kept for `ampere logs`.
pub const RECENT: usize = 1000;

/// The recent records of the stream and a live feed of it. A subscriber
/// that falls behind by more than the feed's capacity loses records (and is
/// told how many), never the stream itself.
pub struct Tap {
    recent: Mutex<VecDeque<Arc<str>>>,
    live: tokio::sync::broadcast::Sender<Arc<str>>,
}

impl Tap {
    fn new() -> Tap {
        Tap {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            live: tokio::sync::broadcast::channel(4096).0,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let line: Arc<str> = String::from_utf8_lossy(bytes).into();
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(line.clone());
        }
        let _ = self.live.send(line);
    }

    /// The last `n` records (each ends with a newline).
    pub fn recent(&self, n: usize) -> Vec<Arc<str>> {
        let recent = self.recent.lock().map(|r| r.clone()).unwrap_or_default();
        let skip = recent.len().saturating_sub(n);
        recent.into_iter().skip(skip).collect()
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.live.subscribe()
    }
}

/// A write to stdout that takes this long means stdout is not being read.
const STALL: Duration = Duration::from_millis(100);
/// A stall this long is reported in the stream once it ends.
const STALL_REPORTED: Duration = Duration::from_secs(1);

/// How long stdout has kept the writer waiting. A reader that stops (a
/// paused terminal, a stuck log shipper) blocks the writer, then, through
/// the bounded queue, the workers' pipes: Node keeps its stdout pipe
/// non-blocking, so an app's writes then queue in its own memory
/// (`console.log`, pino) or wait for `'drain'`, until stdout is read again.
pub struct Stall(Mutex<StallState>);

#[derive(Default)]
struct StallState {
    /// When the write in progress began.
    writing: Option<Instant>,
    /// Time spent in writes that took [`STALL`] or longer, finished ones.
    total: Duration,
}

impl Stall {
    fn new() -> Stall {
        Stall(Mutex::default())
    }

    fn begin(&self) -> Instant {
        let now = Instant::now();
        if let Ok(mut s) = self.0.lock() {
            s.writing = Some(now);
        }
        now
    }

    /// Ends a write begun at `began`; returns its length if it was a stall.
    fn end(&self, began: Instant) -> Option<Duration> {
        let took = began.elapsed();
        let mut s = self.0.lock().ok()?;
        s.writing = None;
        if took < STALL {
            return None;
        }
        s.total += took;
        Some(took)
    }

    /// Seconds spent waiting on stdout so far, the stall in progress too.
    /// Never goes down: the stall in progress moves into the total under
    /// the same lock.
    pub fn blocked_seconds(&self, now: Instant) -> f64 {
        let Ok(s) = self.0.lock() else { return 0.0 };
        let current = s
            .writing
            .map(|since| now.saturating_duration_since(since))
            .filter(|d| *d >= STALL)
            .unwrap_or_default();
        (s.total + current).as_secs_f64()
    }
}

/// Lines of a worker's stderr kept to explain why it died: enough for
/// node's longest reports (an 'error' event nobody listens to: a stack of
/// ten frames, the error's properties, where it was emitted), whose
/// heading is what the crash log quotes.
pub const STDERR_TAIL: usize = 60;
/// Of those, the last lines that a crash's log record carries.
pub const STDERR_SHOWN: usize = 20;

enum Item {
    Record(Vec<u8>),
    Close(std::sync::mpsc::Sender<()>),
}

/// A handle to the log stream; cheap to clone.
#[derive(Clone)]
pub struct Logs {
    tx: mpsc::Sender<Item>,
    pretty: bool,
    color: bool,
    min_level: u8,
    /// Supervisor events dropped because the queue was full: (in all, not
    /// yet reported in the stream).
    dropped: Arc<(AtomicU64, AtomicU64)>,
    tap: Arc<Tap>,
    stall: Arc<Stall>,
}

/// Which worker stream a line came from.
#[derive(Clone)]
pub struct Origin {
    pub service: Arc<str>,
    pub worker: usize,
    pub pid: u32,
    pub stderr: bool,
}

impl Logs {
    /// Starts the writer thread.
    pub fn start(config: &LoggerConfig) -> Logs {
        let (tx, mut rx) = mpsc::channel::<Item>(QUEUE);
        let terminal = std::io::stdout().is_terminal();
        let pretty = match config.format {
            LogFormat::Json => false,
            LogFormat::Pretty => true,
            LogFormat::Auto => terminal,
        };
        let color = pretty && terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let tap = Arc::new(Tap::new());
        let stall = Arc::new(Stall::new());
        let writer_tap = tap.clone();
        let writer_stall = stall.clone();
        std::thread::Builder::new()
            .name("ampere-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
                let mut broken = false;
                // Every write that can reach stdout is timed; a long one is
                // reported after it.
                let write = |out: &mut std::io::BufWriter<_>, bytes: Option<&[u8]>| {
                    let began = writer_stall.begin();
                    let result = match bytes {
                        Some(bytes) => out.write_all(bytes),
                        None => out.flush(),
                    };
                    let took = writer_stall.end(began);
                    (result.is_ok(), took.filter(|t| *t >= STALL_REPORTED))
                };
                while let Some(item) = rx.blocking_recv() {
                    let mut stalled = None;
                    match item {
                        Item::Record(bytes) => {
                            // A closed stdout (`ampere start | head`) must not
                            // stop the runtime: keep draining, write nothing.
                            if !broken {
                                let (ok, took) = write(&mut out, Some(&bytes));
                                broken = !ok;
                                stalled = took;
                            }
                            writer_tap.push(&bytes);
                        }
                        Item::Close(done) => {
                            let _ = out.flush();
                            let _ = done.send(());
                            continue;
                        }
                    }
                    if rx.is_empty() && !broken {
                        let (ok, took) = write(&mut out, None);
                        broken = !ok;
                        stalled = stalled.or(took);
                    }
                    if let Some(took) = stalled.filter(|_| !broken) {
                        let note = stall_note(took, pretty.then_some(color));
                        broken = !(write(&mut out, Some(&note)).0 && write(&mut out, None).0);
                        writer_tap.push(&note);
                    }
                }
                let _ = out.flush();
            })
            .expect("spawning the log writer thread");
        Logs {
            tx,
            pretty,
            color,
            min_level: config.level.number(),
            dropped: Arc::default(),
            tap,
            stall,
        }
    }

    /// How long stdout has held the stream up.
    pub fn stall(&self) -> Arc<Stall> {
        self.stall.clone()
    }

    /// The recent records and the live feed.
    pub fn tap(&self) -> Arc<Tap> {
        self.tap.clone()
    }

    /// Supervisor events dropped so far because stdout could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.0.load(Ordering::Relaxed)
    }

    /// Writes everything queued so far; for the moment before exit.
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.tx.try_send(Item::Close(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
        }
    }

    fn enabled(&self, level: u8) -> bool {
        level >= self.min_level
    }

    /// Queues a supervisor event without waiting (events are few; if the
    /// queue is full the event is dropped rather than stalling the loop).
    pub fn event(&self, level: u8, msg: &str, fields: &[(&str, serde_json::Value)]) {
        if !self.enabled(level) {
            return;
        }
        let rendered = if self.pretty {
            pretty_line(
                self.color,
                now_ms(),
                level,
                Some(("ampere", None)),
                msg,
                fields,
            )
        } else {
            let mut line = format!(
                "{{\"level\":{level},\"time\":{},\"pid\":{},\"name\":\"ampere\",\"msg\":{}",
                now_ms(),
                std::process::id(),
                json_str(msg)
            );
            for (k, v) in fields {
                let _ = write!(line, ",{}:{}", json_str(k), v);
            }
            line.push_str("}\n");
            line.into_bytes()
        };
        // Say what was dropped before, as soon as there is room again.
        let unreported = self.dropped.1.load(Ordering::Relaxed);
        if unreported > 0 && self.tx.capacity() > 1 {
            self.dropped.1.fetch_sub(unreported, Ordering::Relaxed);
            let note = format!(
                "{{\"level\":40,\"time\":{},\"pid\":{},\"name\":\"ampere\",\"msg\":\"dropped {unreported} supervisor log records: stdout did not keep up\"}}\n",
                now_ms(),
                std::process::id()
            );
            let _ = self.tx.try_send(Item::Record(note.into_bytes()));
        }
        if self.tx.try_send(Item::Record(rendered)).is_err() {
            // Never silent: counted here, reported above and in the metrics.
            self.dropped.0.fetch_add(1, Ordering::Relaxed);
            self.dropped.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Formats one line (or piece of a line) of worker output.
    fn worker_record(&self, origin: &Origin, bytes: &[u8], partial: bool) -> Option<Vec<u8>> {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if !partial && let Some(keys) = json_object_keys(bytes) {
            return Some(if self.pretty {
                self.pretty_json_line(origin, bytes)
            } else {
                inject_fields(bytes, &keys, origin)
            });
        }
        let level = if origin.stderr { 50 } else { 30 };
        if !self.enabled(level) {
            return None;
        }
        let (msg, raw) = match std::str::from_utf8(bytes) {
            Ok(s) => (std::borrow::Cow::Borrowed(s), None),
            Err(_) => (
                String::from_utf8_lossy(bytes),
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        };
        let mut fields: Vec<(&str, serde_json::Value)> = Vec::new();
        if partial {
            fields.push(("partial", true.into()));
        }
        if let Some(raw) = raw {
            fields.push(("msg_base64", raw.into()));
        }
        if self.pretty {
            return Some(pretty_line(
                self.color,
                now_ms(),
                level,
                Some((&origin.service, Some((origin.worker, origin.pid)))),
                &msg,
                &fields,
            ));
        }
        let mut line = format!(
            "{{\"level\":{level},\"time\":{},\"service\":{},\"worker\":{},\"pid\":{},\"stream\":\"{}\",\"msg\":{}",
            now_ms(),
            json_str(&origin.service),
            origin.worker,
            origin.pid,
            if origin.stderr { "stderr" } else { "stdout" },
            json_str(&msg),
        );
        for (k, v) in fields {
            let _ = write!(line, ",\"{k}\":{v}");
        }
        line.push_str("}\n");
        Some(line.into_bytes())
    }

    fn pretty_json_line(&self, origin: &Origin, bytes: &[u8]) -> Vec<u8> {
        let value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(bytes).unwrap_or_default();
        let level = value
            .get("level")
            .and_then(|l| l.as_u64())
            .map_or(30, |l| l.min(60) as u8);
        let time = value
            .get("time")
            .and_then(|t| t.as_u64())
            .unwrap_or_else(now_ms);
        let msg = value.get("msg").and_then(|m| m.as_str()).unwrap_or("");
        let skip = ["level", "time", "msg", "pid", "hostname", "v"];
        let fields: Vec<(&str, serde_json::Value)> = value
            .iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        pretty_line(
            self.color,
            time,
            level,
            Some((&origin.service, Some((origin.worker, origin.pid)))),
            msg,
            &fields,
        )
    }
}

/// One record rendered for people: time, level, who, message, fields.
fn pretty_line(
    use_color: bool,
    time: u64,
    level: u8,
    who: Option<(&str, Option<(usize, u32)>)>,
    msg: &str,
    fields: &[(&str, serde_json::Value)],
) -> Vec<u8> {
    let (name, color) = match level {
        0..=10 => ("TRACE", "\x1b[90m"),
        11..=20 => ("DEBUG", "\x1b[36m"),
        21..=30 => ("INFO ", "\x1b[32m"),
        31..=40 => ("WARN ", "\x1b[33m"),
        41..=50 => ("ERROR", "\x1b[31m"),
        _ => ("FATAL", "\x1b[35m"),
    };
    let secs = time / 1000;
    let mut line = format!(
        "{:02}:{:02}:{:02}.{:03} ",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        time % 1000
    );
    if use_color {
        let _ = write!(line, "{color}{name}\x1b[0m ");
    } else {
        let _ = write!(line, "{name} ");
    }
    match who {
        Some((service, Some((worker, pid)))) => {
            let _ = write!(line, "{service}[{worker}:{pid}] ");
        }
        Some((service, None)) => {
            let _ = write!(line, "{service} ");
        }
        None => {}
    }
    line.push_str(msg);
    for (k, v) in fields {
        match v {
            serde_json::Value::String(s) => {
                let _ = write!(line, " {k}={s}");
            }
            other => {
                let _ = write!(line, " {k}={other}");
            }
        }
    }
    line.push('\n');
    line.into_bytes()
}

/// The record that reports a stall of `took` once stdout takes writes again
/// (`pretty`: rendered for people, with colour or not).
fn stall_note(took: Duration, pretty: Option<bool>) -> Vec<u8> {
    let msg = format!(
        "stdout was not read for {:.1} s: workers' output waited meanwhile, in their pipes and \
         their own memory",
        took.as_secs_f64()
    );
    let fields = [(
        "stalled_ms",
        serde_json::Value::from(took.as_millis() as u64),
    )];
    match pretty {
        Some(color) => pretty_line(color, now_ms(), 40, Some(("ampere", None)), &msg, &fields),
        None => format!(
            "{{\"level\":40,\"time\":{},\"pid\":{},\"name\":\"ampere\",\"msg\":{},\"stalled_ms\":{}}}\n",
            now_ms(),
            std::process::id(),
            json_str(&msg),
            took.as_millis()
        )
        .into_bytes(),
    }
}

/// Reads one worker stream to its end, writing every line to the log stream
/// and keeping the last lines of stderr in `tail`.
pub async fn pump(
    reader: impl AsyncRead + Unpin,
    origin: Origin,
    logs: Logs,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let mut lines = FramedRead::new(reader, LineChunks);
    while let Some(Ok((bytes, partial))) = lines.next().await {
        if let Some(tail) = &tail
            && let Ok(mut tail) = tail.lock()
        {
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            let text = String::from_utf8_lossy(&bytes);
            tail.push_back(text.chars().take(500).collect());
        }
        if let Some(record) = logs.worker_record(&origin, &bytes, partial) {
            // Waiting here is the back-pressure: the worker's pipe fills and
            // its writes wait, as they would on a slow terminal.
            if logs.tx.send(Item::Record(record)).await.is_err() {
                return;
            }
        }
    }
}

/// Splits a byte stream into lines, and lines longer than [`MAX_CHUNK`] into
/// pieces (cut on a UTF-8 boundary); yields `(bytes, partial)`.
struct LineChunks;

impl Decoder for LineChunks {
    type Item = (BytesMut, bool);
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let window = &buf[..buf.len().min(MAX_CHUNK + 1)];
        if let Some(nl) = window.iter().position(|b| *b == b'\n') {
            let mut line = buf.split_to(nl + 1);
            line.truncate(nl);
            return Ok(Some((line, false)));
        }
        if buf.len() > MAX_CHUNK {
            let mut cut = MAX_CHUNK;
            // Back up over UTF-8 continuation bytes (at most 3).
            while cut > MAX_CHUNK - 4 && (buf[cut] & 0b1100_0000) == 0b1000_0000 {
                cut -= 1;
            }
            return Ok(Some((buf.split_to(cut), true)));
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        match self.decode(buf)? {
            Some(item) => Ok(Some(item)),
            None if buf.is_empty() => Ok(None),
            None => Ok(Some((buf.split(), false))),
        }
    }
}

/// The top-level keys of `bytes` if it is one JSON object.
fn json_object_keys(bytes: &[u8]) -> Option<HashMap<String, IgnoredAny>> {
    if bytes.first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// `{"service":..,"worker":..,"pid":..,` + the rest of the object, adding only
/// the fields it does not have.
fn inject_fields(bytes: &[u8], keys: &HashMap<String, IgnoredAny>, origin: &Origin) -> Vec<u8> {
    let mut head = String::from("{");
    if !keys.contains_key("service") {
        let _ = write!(head, "\"service\":{},", json_str(&origin.service));
    }
    if !keys.contains_key("worker") {
        let _ = write!(head, "\"worker\":{},", origin.worker);
    }
    if !keys.contains_key("pid") {
        let _ = write!(head, "\"pid\":{},", origin.pid);
    }
    let rest = &bytes[1..];
    let mut out = head.into_bytes();
    if keys.is_empty() {
        out.pop(); // no trailing comma before the closing brace
        out.extend_from_slice(b"}");
    } else {
        out.extend_from_slice(rest);
    }
    out.push(b'\n');
    out
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A `tracing` layer that writes the supervisor's events into the stream.
pub struct TracingLayer {
    pub logs: Logs,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TracingLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = match *event.metadata().level() {
            tracing::Level::TRACE => 10,
            tracing::Level::DEBUG => 20,
            tracing::Level::INFO => 30,
            tracing::Level::WARN => 40,
            tracing::Level::ERROR => 50,
        };
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let fields: Vec<(&str, serde_json::Value)> = visitor
            .fields
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        self.logs.event(level, &visitor.msg, &fields);
    }
}

#[derive(Default)]
struct Fields {
    msg: String,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.msg = text;
        } else {
            self.fields.push((field.name(), text.into()));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_owned();
        } else {
            self.fields.push((field.name(), value.into()));
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.fields.push((field.name(), value.into()));
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.fields.push((field.name(), value.into()));
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.fields.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.fields.push((field.name(), value.into()));
    }
}

/// The tracing filter for a configured level.
pub fn level_filter(level: LogLevel) -> tracing_subscriber::filter::LevelFilter {
    use tracing_subscriber::filter::LevelFilter;
    match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error | LogLevel::Fatal => LevelFilter::ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            service: "api".into(),
            worker: 1,
            pid: 42,
            stderr: false,
        }
    }

    #[test]
    fn pino_lines_pass_through_with_fields_added() {
        let line = br#"{"level":30,"time":1,"pid":42,"msg":"hi"}"#;
        let keys = json_object_keys(line).unwrap();
        let out = String::from_utf8(inject_fields(line, &keys, &origin())).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["service"], "api");
        assert_eq!(v["worker"], 1);
        assert_eq!(v["msg"], "hi");
        assert_eq!(out.matches("\"pid\"").count(), 1);
        let empty = String::from_utf8(inject_fields(b"{}", &HashMap::new(), &origin())).unwrap();
        assert!(
            serde_json::from_str::<serde_json::Value>(&empty).is_ok(),
            "{empty}"
        );
    }

    #[test]
    fn long_lines_are_cut_on_char_boundaries_and_nothing_is_lost() {
        let mut text = "é".repeat(MAX_CHUNK); // 2 bytes each
        text.push('\n');
        text.push_str("tail without newline");
        let mut buf = BytesMut::from(text.as_bytes());
        let mut codec = LineChunks;
        let mut joined = Vec::new();
        let mut parts = 0;
        while let Some((chunk, _)) = codec.decode_eof(&mut buf).unwrap() {
            assert!(std::str::from_utf8(&chunk).is_ok());
            joined.extend_from_slice(&chunk);
            parts += 1;
        }
        assert!(parts >= 3);
        assert_eq!(joined.len(), text.len() - 1); // all but the newline
    }
}
