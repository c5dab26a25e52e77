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

use crate::config::ListenerMode;
use crate::error::Error;

pub struct Listeners {
    addr: SocketAddr,
    mode: ListenerMode,
    sockets: Vec<Socket>,
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
            sockets,
        })
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
        for socket in &self.sockets {
            socket.attach_filter(&drop_syn)?;
        }
        Ok(())
    }

    /// Connections waiting in `slot`'s accept queue.
    pub fn queued(&self, slot: usize) -> io::Result<u32> {
        accept_queue_len(self.socket(slot))
    }
}

fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> socket2::SockFilter {
    socket2::SockFilter::new(code as u16, jt, jf, k)
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
            "use 0.0.0.0 (all addresses), 127.0.0.1, or an address of this machine".to_owned(),
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
