//! Test harness: starts the real `ampere` binary on a fixture app and a free
//! port, collects its log stream, waits for conditions with deadlines, talks
//! HTTP/1.1 over real sockets, and cleans up every process it started.
//!
//! The HTTP client is a few lines over `TcpStream` on purpose: the tests need
//! to know at which stage a request failed (connect, write, read), which
//! general-purpose clients hide.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const AMPERE: &str = env!("CARGO_BIN_EXE_ampere");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A port that was free a moment ago, below the kernel's range of ephemeral
/// ports: the tests' own client connections take their local ports from
/// that range, and one of them could take the port between this check and
/// ampere's bind (seen in CI as "the address is already in use"). Each test
/// process walks its own sequence, from a start that its pid picks.
pub fn free_port() -> u16 {
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span.min(1000) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOWEST + start.wrapping_add(n) % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    // No room below the ephemeral range: any free port.
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it holds or `limit` passes; panics with `what`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The log stream of a running ampere, one parsed JSON object per line.
#[derive(Clone, Default)]
pub struct LogLines(Arc<(Mutex<Vec<serde_json::Value>>, Condvar)>, Arc<Counted>);

/// Lines that contain `pattern` are only counted, not kept (for floods).
#[derive(Default)]
pub struct Counted {
    pub pattern: Mutex<Option<String>>,
    pub count: std::sync::atomic::AtomicUsize,
    /// While set, ampere's stdout is not read: a stalled log consumer.
    pub paused: AtomicBool,
}

impl LogLines {
    /// From now on, lines containing `pattern` are counted, not kept.
    pub fn count_only(&self, pattern: &str) {
        *self.1.pattern.lock().unwrap() = Some(pattern.to_owned());
    }

    /// Stops (or resumes) reading ampere's stdout.
    pub fn pause(&self, paused: bool) {
        self.1
            .paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn counted(&self) -> usize {
        self.1.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn all(&self) -> Vec<serde_json::Value> {
        self.0.0.lock().unwrap().clone()
    }

    /// The lines so far whose message `matches`.
    pub fn where_msg(&self, matches: impl Fn(&str) -> bool) -> Vec<serde_json::Value> {
        self.all()
            .into_iter()
            .filter(|l| l["msg"].as_str().is_some_and(&matches))
            .collect()
    }

    /// Waits for a line that satisfies `pred` and returns it.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        let (lock, cvar) = &*self.0;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| pred(l)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for log line: {what}\nlog so far:\n{}",
                lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            lines = cvar.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.0.0.lock().unwrap().iter().filter(|l| pred(l)).count()
    }

    fn push(&self, v: serde_json::Value) {
        let (lock, cvar) = &*self.0;
        lock.lock().unwrap().push(v);
        cvar.notify_all();
    }
}

pub fn msg_is(line: &serde_json::Value, msg: &str) -> bool {
    line["msg"].as_str().is_some_and(|m| m.starts_with(msg))
}

/// A running `ampere start`.
pub struct Ampere {
    pub child: Child,
    pub port: u16,
    /// The probe server's port.
    pub metrics_port: u16,
    pub logs: LogLines,
    pub stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Ampere {
    /// Starts `ampere start <dir> --port <free> --host 127.0.0.1 <extra...>`.
    pub fn start(dir: &Path, extra: &[&str]) -> Ampere {
        Self::start_with(dir, extra, &[], |_| {})
    }

    /// `ampere start dir` on fresh ports with `extra` flags, run through
    /// `launcher` (a program and its arguments, ampere's path then
    /// following; empty: ampere itself), after `setup` has had its say
    /// (the environment, say).
    pub fn start_with(
        dir: &Path,
        extra: &[&str],
        launcher: &[&str],
        setup: impl FnOnce(&mut Command),
    ) -> Ampere {
        let port = free_port();
        let metrics_port = free_port();
        let mut cmd = match launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(AMPERE);
                cmd
            }
            None => Command::new(AMPERE),
        };
        cmd.arg("start")
            .arg(dir)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--metrics-port", &metrics_port.to_string()])
            .args(extra)
            // A CI runner in a Kubernetes pod would add a shutdown delay.
            .env_remove("KUBERNETES_SERVICE_HOST");
        setup(&mut cmd);
        Self::spawn(cmd, port, metrics_port)
    }

    pub fn spawn(mut cmd: Command, port: u16, metrics_port: u16) -> Ampere {
        cmd.env("NEXT_TELEMETRY_DISABLED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning ampere");
        let logs = LogLines::default();
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::with_capacity(4096, stdout).lines() {
                while sink.1.paused.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let Ok(line) = line else { break };
                if let Some(p) = &*sink.1.pattern.lock().unwrap()
                    && line.contains(p.as_str())
                {
                    sink.1
                        .count
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                match serde_json::from_str(&line) {
                    Ok(v) => sink.push(v),
                    Err(_) => sink.push(serde_json::json!({ "unparsed": line })),
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            err_sink.lock().unwrap().push_str(&s);
        });
        Ampere {
            child,
            port,
            metrics_port,
            logs,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A probe: GET on the probe server with a 1 s timeout.
    pub fn probe(&self, path: &str) -> Result<Response, Failure> {
        get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port)),
            path,
            Duration::from_secs(1),
        )
    }

    /// Waits until `n` workers have reported ready; returns their pids.
    pub fn wait_ready(&mut self, n: usize, limit: Duration) -> Vec<u32> {
        let deadline = Instant::now() + limit;
        loop {
            let pids: Vec<u32> = self
                .logs
                .all()
                .iter()
                .filter(|l| msg_is(l, "worker ready"))
                .filter_map(|l| l["worker_pid"].as_u64().map(|p| p as u32))
                .collect();
            if pids.len() >= n {
                return pids;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ampere exited with {status} before {n} workers were ready\nstderr: {}\nlog: {:#?}",
                    self.stderr.lock().unwrap(),
                    self.logs.all()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} ready workers; log: {:#?}",
                self.logs.all()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: Signal) {
        signal(self.child.id(), sig);
    }

    /// Waits for ampere to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return status.code();
            }
            assert!(Instant::now() < deadline, "ampere did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ampere {
    fn drop(&mut self) {
        // Workers die with the supervisor (PR_SET_PDEATHSIG).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use nix::sys::signal::Signal;

/// Whether this test process is root; where it is not, says that the
/// test is skipped and why (`needs`: what it needs root for).
pub fn root_or_skip(needs: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: needs root {needs}");
    }
    root
}

/// A launcher for [`Ampere::start_with`] that makes ampere PID 1 of a new
/// pid namespace, as in a container (needs root). --kill-child: a failing
/// test (which kills unshare) leaves nothing.
pub const NEW_PID_NAMESPACE: [&str; 5] =
    ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];

/// The sum of the samples of metric `name` whose line contains `label`.
pub fn metric(ampere: &Ampere, name: &str, label: &str) -> f64 {
    let body = ampere.probe("/metrics").expect("/metrics").body;
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// A config file for the hello fixture: `[app] dir` plus `body`; the file
/// lives as long as the value.
pub struct HelloConfig {
    _dir: tempfile::TempDir,
    pub path: String,
}

pub fn hello_config(body: &str) -> HelloConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ampere.toml");
    let dir_line = format!(
        "[app]\ndir = {:?}\n",
        fixture("hello").display().to_string()
    );
    std::fs::write(&path, dir_line + body).unwrap();
    HelloConfig {
        path: path.to_str().unwrap().to_owned(),
        _dir: dir,
    }
}

/// Is a process alive (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(") ")
            .next()
            .is_some_and(|r| r.starts_with('Z') || r.starts_with('X')),
        Err(_) => false,
    }
}

/// Children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
            && let Some(rest) = stat.rsplit(") ").next()
            && rest.split(' ').nth(1).and_then(|pp| pp.parse::<u32>().ok()) == Some(pid)
        {
            out.push(p);
        }
    }
    out
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn pid(&self) -> u32 {
        self.header("x-worker-pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no x-worker-pid in {self:?}"))
    }
}

/// At which stage a request failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection was never established (refused, timed out).
    Connect(String),
    /// Established, then broken before a complete response.
    AfterConnect(String),
}

/// One GET on a new connection with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Failure> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| Failure::Connect(e.to_string()))?;
    request(&mut stream, path, false, timeout)
}

/// Sends one GET on `stream` and reads the response.
pub fn request(
    stream: &mut TcpStream,
    path: &str,
    keep_alive: bool,
    timeout: Duration,
) -> Result<Response, Failure> {
    let broken = |e: std::io::Error| Failure::AfterConnect(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(broken)?;
    let conn = if keep_alive { "keep-alive" } else { "close" };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {conn}\r\n\r\n"
    )
    .map_err(broken)?;
    read_response(stream).map_err(broken)
}

pub fn read_response(stream: &mut TcpStream) -> std::io::Result<Response> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = find("content-length").and_then(|l| l.parse::<usize>().ok()) {
        let mut buf = vec![0; len];
        reader.read_exact(&mut buf)?;
        buf
    } else if find("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body
    } else {
        let mut buf = Vec::new();
        reader.read_to_end(&mut buf)?;
        buf
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Makes sure a fixture's npm packages (and, for Next.js, its production
/// build) exist; `.ci/run` prepares them up front, this covers a bare
/// `cargo test` after a fresh clone.
pub fn prepare_fixture(name: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fixture(name);
    let run = |args: &[&str]| {
        let status = Command::new(args[0])
            .args(&args[1..])
            .current_dir(&dir)
            .env("NEXT_TELEMETRY_DISABLED", "1")
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("running {args:?} in {}: {e}", dir.display()));
        assert!(status.success(), "{args:?} failed in {}", dir.display());
    };
    if dir.join("package-lock.json").is_file() && !dir.join("node_modules").is_dir() {
        run(&["npm", "ci", "--no-audit", "--no-fund"]);
    }
    if name == "next" && !dir.join(".next/BUILD_ID").is_file() {
        run(&["npx", "next", "build"]);
    }
    dir
}

/// Sends `n` requests, each on a new connection, and returns the answering
/// pids; every request must succeed with 200.
pub fn pids_of_requests(addr: SocketAddr, path: &str, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| {
            let r = get(addr, path, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
            assert_eq!(r.status, 200, "request {i}: {r:?}");
            r.pid()
        })
        .collect()
}

/// Clients sending requests in a loop until stopped; every outcome is kept
/// (the pid that answered 200, or what went wrong).
pub struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Result<u32, String>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each sending GET `path`, on a new connection per
    /// request, or on keep-alive connections (reconnecting when a response
    /// says `Connection: close`). `on_response` sees every 200.
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        path: &'static str,
        keep_alive: bool,
        on_response: Arc<dyn Fn(&Response) + Send + Sync>,
    ) -> Load {
        Load::paced(
            addr,
            clients,
            path,
            keep_alive,
            Duration::ZERO,
            Duration::from_secs(10),
            on_response,
        )
    }

    /// Like `start`, with `pause` after each request and a client timeout.
    pub fn paced(
        addr: SocketAddr,
        clients: usize,
        path: &'static str,
        keep_alive: bool,
        pause: Duration,
        timeout: Duration,
        on_response: Arc<dyn Fn(&Response) + Send + Sync>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, outcomes, on_response) =
                    (stop.clone(), outcomes.clone(), on_response.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let result = if keep_alive {
                            let stream = match &mut conn {
                                Some(s) => s,
                                None => match TcpStream::connect(addr) {
                                    Ok(s) => conn.insert(s),
                                    Err(e) => {
                                        outcomes.lock().unwrap().push(Err(format!("connect: {e}")));
                                        continue;
                                    }
                                },
                            };
                            let r = request(stream, path, true, timeout);
                            if r.as_ref()
                                .is_ok_and(|r| r.header("connection") == Some("close"))
                            {
                                conn = None;
                            }
                            r
                        } else {
                            get(addr, path, timeout)
                        };
                        let outcome = match result {
                            Ok(r) if r.status == 200 => {
                                on_response(&r);
                                Ok(r.pid())
                            }
                            Ok(r) => Err(format!("status {}", r.status)),
                            Err(e) => {
                                conn = None;
                                Err(format!("{e:?}"))
                            }
                        };
                        outcomes.lock().unwrap().push(outcome);
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            threads,
        }
    }

    /// Requests done so far.
    pub fn count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Whether the process `pid` answered a request with 200.
    pub fn answered_by(&self, pid: u32) -> bool {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.as_ref().is_ok_and(|p| *p == pid))
    }

    /// Stops the clients; returns the failed requests.
    pub fn finish(self) -> Vec<String> {
        self.outcomes()
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Stops the clients; returns every outcome.
    pub fn outcomes(self) -> Vec<Result<u32, String>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.outcomes)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// A seccomp filter for `Command::pre_exec` (x86_64): the system call `nr`
/// fails with `errno` where its arguments match `args` (argument index, low
/// 32 bits), as a restrictive sandbox or kernel would make it; everything
/// else is allowed. Inherited by every process ampere starts.
#[cfg(target_arch = "x86_64")]
pub fn deny_syscall(
    nr: libc::c_long,
    args: &[(u32, u32)],
    errno: i32,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // Equal: skip the next instruction (which allows the call).
    let jeq = |k: u32| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 1,
        jf: 0,
        k,
    };
    // struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low half
    // first on little-endian).
    let load = |offset: u32| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    let allow = stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    let mut filter = vec![
        load(4),
        jeq(AUDIT_ARCH_X86_64),
        allow,
        load(0),
        jeq(nr as u32),
        allow,
    ];
    for (index, value) in args {
        filter.extend([load(16 + 8 * index), jeq(*value), allow]);
    }
    filter.push(stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | errno as u32,
    ));
    // Built here, before the fork: the hook itself only makes two prctl(2)
    // calls, which are async-signal-safe.
    move || {
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: plain prctl(2) calls; `prog` and `filter` outlive them, and
        // the kernel copies the program.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
