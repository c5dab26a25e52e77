//! Listening sockets of a service, owned by the supervisor for its whole life.
//!
//! "reuseport": one socket per worker slot, all bound to the same address
//! with SO_REUSEPORT, so each slot has its own accept queue and the kernel
//! spreads new connections over them. "shared": a single socket that every
//! slot accepts from. Either way a slot's socket is handed to its worker
//! process by file descriptor and stays open here while the process in the
//! slot is replaced, so connections queued on it wait for the replacement
//! instead of being reset (closing a listener resets its queue). Sockets are
//! never closed before the runtime exits, which also keeps the reuseport
//! group's indices stable for BPF steering.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::balance::Weights;
use crate::config::ListenerMode;
use crate::error::Error;

pub struct Listeners {
    addr: SocketAddr,
    mode: ListenerMode,
    sockets: Vec<Socket>,
    /// The supervisor's own member of the reuseport group; it gets
    /// connections only when the steering program picks it.
    overflow: Option<Socket>,
    /// Who joined the reuseport group at each index, in order: the kernel
    /// numbers the members that way, and the steering program picks by it.
    order: Vec<Member>,
    backlog: i32,
    /// Why the kernel refused the steering program, if it did before any
    /// program was attached: gVisor, and seccomp profiles that deny
    /// SO_ATTACH_REUSEPORT_CBPF. Steering is then off for good (the
    /// kernel's hash spreads connections), rather than tried and refused on
    /// every change of weights.
    refused: std::sync::OnceLock<String>,
    /// A program was attached once: later errors are not a refusal.
    attached: std::sync::atomic::AtomicBool,
}

/// What ampere says, once, when the kernel refuses the steering program.
pub const STEERING_REFUSED: &str = "this kernel refuses reuseport steering programs \
    (SO_ATTACH_REUSEPORT_CBPF; gVisor and some seccomp profiles do): the kernel's hash spreads \
    new connections over the workers, without load-aware steering or the overflow listener; \
    admission control in the workers still works";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Slot(usize),
    Overflow,
}

impl Listeners {
    /// Binds `slots` listening sockets (one, in shared mode) on `addr`.
    pub fn bind(
        addr: SocketAddr,
        slots: usize,
        mode: ListenerMode,
        backlog: u32,
    ) -> Result<Self, Error> {
        let fail = |e: io::Error| bind_error(addr, e);
        // SO_REUSEPORT would let us join a group that another process of the
        // same user already listens in, silently sharing its traffic. A
        // socket without it fails to bind if anything listens there.
        probe(addr).map_err(fail)?;
        let count = match mode {
            ListenerMode::Reuseport => slots,
            ListenerMode::Shared => 1,
        };
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        let sockets = (0..count)
            .map(|_| {
                let socket = new_socket(addr)?;
                if mode == ListenerMode::Reuseport {
                    socket.set_reuse_port(true)?;
                }
                socket.bind(&addr.into())?;
                socket.listen(backlog)?;
                Ok(socket)
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(fail)?;
        Ok(Listeners {
            addr,
            mode,
            order: (0..sockets.len()).map(Member::Slot).collect(),
            sockets,
            overflow: None,
            backlog,
            refused: std::sync::OnceLock::new(),
            attached: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes sure slot `slot` has a socket: in reuseport mode, binds the
    /// sockets of new slots (they join the group after every existing
    /// member); in shared mode every slot uses the one socket.
    pub fn ensure_slot(&mut self, slot: usize) -> io::Result<()> {
        if self.mode == ListenerMode::Shared {
            return Ok(());
        }
        while self.sockets.len() <= slot {
            let socket = new_socket(self.addr)?;
            socket.set_reuse_port(true)?;
            socket.bind(&self.addr.into())?;
            socket.listen(self.backlog)?;
            self.order.push(Member::Slot(self.sockets.len()));
            self.sockets.push(socket);
        }
        Ok(())
    }

    /// Adds the overflow listener to the reuseport group and returns it for
    /// the supervisor to accept from. A steering program that only picks
    /// slots is attached first, so that the kernel's hash never sends a
    /// connection to the overflow listener on its own.
    pub fn open_overflow(&mut self) -> io::Result<std::net::TcpListener> {
        if !self.can_steer() {
            return Err(io::Error::other("overflow needs reuseport listeners"));
        }
        self.steer(&Weights {
            slots: vec![1; self.sockets.len()],
            overflow: 0,
        })?;
        let socket = new_socket(self.addr)?;
        socket.set_reuse_port(true)?;
        socket.bind(&self.addr.into())?;
        // The overflow listener takes connections in bursts (every client
        // turned away by a worker reconnects) and drains its queue fast.
        socket.listen(self.backlog.max(4096))?;
        socket.set_nonblocking(true)?;
        let listener = socket.try_clone()?;
        self.overflow = Some(socket);
        self.order.push(Member::Overflow);
        Ok(listener.into())
    }

    pub fn has_overflow(&self) -> bool {
        self.overflow.is_some()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn mode(&self) -> ListenerMode {
        self.mode
    }

    /// The socket that the worker in `slot` accepts from.
    pub fn fd(&self, slot: usize) -> BorrowedFd<'_> {
        self.socket(slot).as_fd()
    }

    fn socket(&self, slot: usize) -> &Socket {
        &self.sockets[slot % self.sockets.len()]
    }

    /// Stops the kernel from completing new handshakes on every socket: a
    /// socket filter drops incoming SYNs (clients retry, then see a refusal
    /// once the sockets close) while handshakes already under way complete
    /// and queue. Workers can then empty the accept queues before they stop,
    /// so that no connection the kernel accepted is reset at shutdown.
    pub fn refuse_new_connections(&self) -> io::Result<()> {
        // Classic BPF over the TCP header (a TCP socket filter runs with the
        // packet data starting at the TCP header): drop if SYN is set.
        let drop_syn = [
            bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13), // A = tcp flags
            bpf(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 1, 0x02), // SYN?
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),                 // drop
            bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),          // keep
        ];
        for socket in self.sockets.iter().chain(&self.overflow) {
            socket.attach_filter(&drop_syn)?;
        }
        Ok(())
    }

    /// Whether [`Listeners::steer`] can pick members of the group:
    /// reuseport mode, and a kernel that has not refused the program. One
    /// slot counts too: the overflow listener joins its group.
    pub fn can_steer(&self) -> bool {
        self.mode == ListenerMode::Reuseport
            && !self.sockets.is_empty()
            && self.refused.get().is_none()
    }

    /// Attaches a program that spreads new connections evenly, to learn
    /// whether this kernel lets a reuseport group be steered. Err (once,
    /// with the kernel's reason) when it does not: [`Listeners::can_steer`]
    /// is false from then on.
    pub fn probe_steering(&self) -> io::Result<()> {
        self.steer(&Weights {
            slots: vec![1; self.sockets.len()],
            overflow: 0,
        })
    }

    /// Why steering is off for good, if the kernel refused it.
    pub fn steering_refused(&self) -> Option<&str> {
        self.refused.get().map(String::as_str)
    }

    /// Steers new connections over the slots (and the overflow listener) by
    /// weight: a classic BPF program on the reuseport group picks socket `i`
    /// with probability `weights[i] / sum(weights)`. Attaching through any
    /// one member applies to the whole group and replaces the previous
    /// program. With every weight 0 the slots share equally.
    pub fn steer(&self, weights: &Weights) -> io::Result<()> {
        if !self.can_steer() {
            return Ok(());
        }
        let mut all: Vec<u32> = self
            .order
            .iter()
            .map(|m| match m {
                Member::Slot(i) => weights.slots.get(*i).copied().unwrap_or(0),
                Member::Overflow => weights.overflow,
            })
            .collect();
        if all.iter().all(|w| *w == 0) {
            for (w, m) in all.iter_mut().zip(&self.order) {
                if let Member::Slot(i) = m
                    && weights.slots.len() > *i
                {
                    *w = 1;
                }
            }
        }
        let program = steering_program(&all);
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        nix::sys::socket::setsockopt(
            &self.sockets[0],
            nix::sys::socket::sockopt::AttachReusePortCbpf,
            &fprog,
        )
        .map(|()| {
            self.attached
                .store(true, std::sync::atomic::Ordering::Relaxed)
        })
        .map_err(|errno| {
            let e = io::Error::from(errno);
            // Refused outright before anything was attached (not a passing
            // shortage of memory): off for good.
            if !self.attached.load(std::sync::atomic::Ordering::Relaxed)
                && matches!(
                    errno,
                    nix::errno::Errno::EPERM
                        | nix::errno::Errno::EACCES
                        | nix::errno::Errno::ENOPROTOOPT
                        | nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::EINVAL
                        | nix::errno::Errno::ENOSYS
                )
            {
                let _ = self.refused.set(e.to_string());
            }
            e
        })
    }

    /// Connections waiting in `slot`'s accept queue.
    pub fn queued(&self, slot: usize) -> io::Result<u32> {
        accept_queue_len(self.socket(slot))
    }
}

/// `SKF_AD_OFF + SKF_AD_RANDOM`: an ancillary load of a pseudo-random u32.
const LOAD_RANDOM: u32 = (-0x1000i32) as u32 + 56;

/// The reuseport program for [`Listeners::steer`]: `A = random % total`, then
/// a chain of `if A < cumulative[i] return i`. Socket indices are the order
/// in which the sockets joined the group (`Listeners::order`). They stay
/// stable because no socket of the group is ever closed before the end.
fn steering_program(weights: &[u32]) -> Vec<libc::sock_filter> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let raw = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    if total == 0 {
        return vec![raw(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX)];
    }
    let total = u32::try_from(total).unwrap_or(u32::MAX);
    let mut prog = vec![
        raw(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            0,
            0,
            LOAD_RANDOM,
        ),
        raw(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, total),
    ];
    let mut cumulative = 0u32;
    let mut last = 0u32;
    for (i, w) in weights.iter().enumerate() {
        if *w == 0 {
            continue;
        }
        cumulative = cumulative.saturating_add(*w);
        last = i as u32;
        // A >= cumulative: skip the return, try the next slot.
        prog.push(raw(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            1,
            0,
            cumulative,
        ));
        prog.push(raw(libc::BPF_RET | libc::BPF_K, 0, 0, i as u32));
    }
    prog.push(raw(libc::BPF_RET | libc::BPF_K, 0, 0, last));
    prog
}

fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> socket2::SockFilter {
    socket2::SockFilter::new(code as u16, jt, jf, k)
}

/// Whether this kernel has IPv6 sockets (not with `ipv6.disable=1`, nor
/// under a sandbox that denies them). Asked once.
pub fn ipv6_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
            Ok(_) => true,
            // Out of descriptors or memory says nothing about IPv6: the
            // bind that follows reports it.
            Err(e) => !matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EACCES | libc::EPERM)
            ),
        }
    })
}

/// A plain listening socket (the probe server's): "::" takes IPv4 too,
/// whatever the system's `bindv6only` default.
pub fn bind_plain(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = new_socket(addr)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Rebinding over connections in TIME_WAIT after a restart of ampere.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // "::" serves IPv4 too, as node's listen() does.
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

fn probe(addr: SocketAddr) -> io::Result<()> {
    let socket = new_socket(addr)?;
    socket.bind(&addr.into())
}

fn bind_error(addr: SocketAddr, e: io::Error) -> Error {
    let port = addr.port();
    let (reason, hint) = match e.raw_os_error() {
        Some(libc::EADDRINUSE) => (
            "the address is already in use".to_owned(),
            format!(
                "another process listens on port {port} (`ss -ltnp 'sport = :{port}'` shows which); stop it, or choose another port with --port"
            ),
        ),
        Some(libc::EACCES) => (
            "permission denied".to_owned(),
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; use a higher port".to_owned(),
        ),
        Some(libc::EADDRNOTAVAIL) => (
            "the address is not one of this machine's".to_owned(),
            "use :: (all addresses), 0.0.0.0 (all IPv4 addresses), 127.0.0.1, or an address of this machine".to_owned(),
        ),
        _ => (e.to_string(), String::new()),
    };
    Error::Bind {
        addr: addr.to_string(),
        reason,
        hint: (!hint.is_empty()).then_some(hint),
    }
}

/// The accept-queue length of a listening socket, from TCP_INFO (for a
/// listener, `tcpi_unacked` is the number of connections waiting in it).
fn accept_queue_len(socket: &Socket) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data, so all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is a socket we own for the duration of the call; `info`
    // and `len` are valid for writes and `len` holds the buffer's size, which
    // the kernel never exceeds.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    fn loopback() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap()
    }

    #[test]
    fn queue_length_counts_waiting_connections() {
        let addr = loopback();
        let listeners = Listeners::bind(addr, 2, ListenerMode::Shared, 16).unwrap();
        assert_eq!(listeners.queued(0).unwrap(), 0);
        let _a = TcpStream::connect(addr).unwrap();
        let _b = TcpStream::connect(addr).unwrap();
        assert_eq!(listeners.queued(1).unwrap(), 2);
    }

    #[test]
    fn a_taken_port_is_refused_even_by_reuseport() {
        let addr = loopback();
        let first = Listeners::bind(addr, 2, ListenerMode::Reuseport, 16).unwrap();
        let err = Listeners::bind(addr, 2, ListenerMode::Reuseport, 16)
            .err()
            .unwrap();
        assert!(err.to_string().contains("already in use"), "{err}");
        drop(first);
    }

    #[test]
    fn steering_sends_every_connection_to_the_weighted_slots() {
        let addr = loopback();
        let listeners = Listeners::bind(addr, 3, ListenerMode::Reuseport, 64).unwrap();
        listeners.steer(&weights(&[0, 1, 0], 0)).unwrap();
        let conns: Vec<_> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(listeners.queued(1).unwrap(), 20);
        assert_eq!(
            listeners.queued(0).unwrap() + listeners.queued(2).unwrap(),
            0
        );
        drop(conns);
        // Equal weights spread over all three.
        listeners.steer(&weights(&[1, 1, 1], 0)).unwrap();
        let _conns: Vec<_> = (0..60).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for slot in 0..3 {
            assert!(
                listeners.queued(slot).unwrap() >= 5,
                "slot {slot} got too few"
            );
        }
    }

    fn weights(slots: &[u32], overflow: u32) -> Weights {
        Weights {
            slots: slots.to_vec(),
            overflow,
        }
    }

    #[test]
    fn the_overflow_listener_gets_connections_only_when_steered_to() {
        let addr = loopback();
        let mut listeners = Listeners::bind(addr, 2, ListenerMode::Reuseport, 64).unwrap();
        let overflow = listeners.open_overflow().unwrap();
        let overflow_queue = |l: &std::net::TcpListener| {
            let mut n = 0;
            while l.accept().is_ok() {
                n += 1;
            }
            n
        };
        let _conns: Vec<_> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(overflow_queue(&overflow), 0);
        assert_eq!(
            listeners.queued(0).unwrap() + listeners.queued(1).unwrap(),
            40
        );
        listeners.steer(&weights(&[0, 0], 1)).unwrap();
        let _more: Vec<_> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(overflow_queue(&overflow), 10);
        // All zero: the slots share, never the overflow listener.
        listeners.steer(&weights(&[0, 0], 0)).unwrap();
        let _last: Vec<_> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(overflow_queue(&overflow), 0);
    }

    #[test]
    fn slots_added_after_the_overflow_listener_are_steered_to_by_slot() {
        let addr = loopback();
        let mut listeners = Listeners::bind(addr, 2, ListenerMode::Reuseport, 64).unwrap();
        let _overflow = listeners.open_overflow().unwrap();
        listeners.ensure_slot(2).unwrap();
        listeners.steer(&weights(&[0, 0, 1], 0)).unwrap();
        let _conns: Vec<_> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(listeners.queued(2).unwrap(), 10);
    }

    #[test]
    fn refusing_drops_new_handshakes_but_keeps_the_queue() {
        let addr = loopback();
        let listeners = Listeners::bind(addr, 1, ListenerMode::Reuseport, 16).unwrap();
        let _queued = TcpStream::connect(addr).unwrap();
        listeners.refuse_new_connections().unwrap();
        let late = TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300));
        assert!(late.is_err(), "a new handshake completed after refusing");
        assert_eq!(listeners.queued(0).unwrap(), 1);
    }
}
