//! Handing live client connections from one worker to another.
//!
//! When a worker is replaced (a reload, `max_requests_per_worker`, SIGTTOU,
//! a rolled-back reload), its clients must not notice: nbNet clients keep
//! their connection open and send request after request, so closing it —
//! even at a frame boundary — costs each of them a failed request. Instead,
//! each connection that is owed nothing (no answer being computed, no
//! answer waiting to be sent) is passed, as a file descriptor
//! (`SCM_RIGHTS`), to a worker of the current generation, with what that
//! worker needs to go on: the listener it came in on, the client's address
//! (the PROXY protocol's, where used), its connection id, and what the old
//! worker read from it and did not answer ([`Unread`]). Bytes the client
//! sent meanwhile wait in the socket for the new worker to read.
//!
//! # The channel
//!
//! Every worker has a control channel to the master: a `SOCK_SEQPACKET`
//! socket pair made when the worker is forked (one message per record, so
//! no framing of our own). The master relays: a retiring worker sends each
//! connection to the master, which picks a ready worker of the serving
//! generation and sends it on (`nbnet` never lets a connection reach a
//! generation that is not serving). The master also uses the channel to
//! tell a worker to hand its connections over ([`Message::HandOver`]).
//!
//! # Records
//!
//! `H` — hand your connections over and leave (master → worker).
//! `R` — replace me: I served `max_requests_per_worker` (worker → master).
//! `S`, `F` — the server stops, gracefully or fast (master → worker).
//! `U version` — ready: every worker of mine serves (a new master → the
//! master that started it, during a binary upgrade; see
//! `supervisor/upgrade.rs`). `P` — promoted: the pid file and the service
//! are yours; my connections follow (old master → new master). `E reason`
//! — I could not start (a new master's child side → the old master).
//! `C kind flags id:u64 listener:u16+bytes peer:u16+bytes` with one file
//! descriptor — a connection (worker → master → worker); `flags` bit 0: it
//! pipelines, bit 1: it still owes its PROXY header, bit 2: a second
//! descriptor follows, a sealed memfd holding bytes the client sent that
//! the old worker read but did not answer (see [`Unread`]). Integers are
//! little-endian. A record that does not parse is dropped, its descriptors
//! closed.
//!
//! # Unread bytes
//!
//! A connection need not wait for a frame boundary to move: what the old
//! worker read and did not answer — part of a frame, frames held back, or
//! requests a thread pool had queued but not started (taken back from the
//! pool, see `plugin::pool`) — goes along in a memfd, and the new worker
//! reads it before the socket. Only answers owed to the client (a deferred
//! answer not completed yet, bytes not yet sent) keep a connection where
//! it is until they are delivered.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

/// What a connection's descriptor is, so the new worker wraps it right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A TCP socket.
    Tcp,
    /// A Unix domain stream socket.
    Unix,
}

/// A connection on its way to another worker.
#[derive(Debug, PartialEq, Eq)]
pub struct Connection {
    /// TCP or Unix.
    pub kind: StreamKind,
    /// Its id (kept: plugins see one id for the connection's whole life).
    pub id: u64,
    /// The client pipelines (a hint for the next read).
    pub pipelining: bool,
    /// Its listener wants a PROXY header first, and none has come yet.
    pub awaiting_proxy_header: bool,
    /// The address of the listener it came in on, as the config writes it.
    pub listener: String,
    /// The client's address (after a PROXY header, the real client's).
    pub peer: String,
}

/// One record on a control channel.
#[derive(Debug)]
pub enum Message {
    /// Master → worker: hand every connection over, then exit.
    HandOver,
    /// Worker → master: "replace me" (it served `max_requests_per_worker`;
    /// the scoreboard says so too — this wakes the master at once).
    Retire,
    /// A connection was on its way here but its descriptor could not be
    /// received: this process has no descriptor free (the kernel closed
    /// it). What the record said of it, for the log.
    Lost(String),
    /// Master → worker: the server stops — gracefully (close connections
    /// at frame boundaries) or fast. Sent besides the signal (SIGTERM or
    /// SIGINT), which a plugin can catch or block; this it cannot.
    Stop {
        /// Close everything now (SIGINT's stop).
        fast: bool,
    },
    /// A connection and its descriptors.
    Connection(Connection, Descriptors),
    /// New master → old master (binary upgrade): every worker of the new
    /// master is ready; its version line.
    Ready(String),
    /// Old master → new master (binary upgrade): you serve now; the pid
    /// file is unlocked for you, and the old workers' connections follow.
    Promoted,
    /// The process started to be the new master could not run the binary:
    /// why.
    Failed(String),
}

/// The longest record (two addresses of at most 4 KiB each and the rest).
const MAX_RECORD: usize = 12 + 2 * (2 + 4096);

/// A control channel: (master's end, worker's end), both non-blocking and
/// close-on-exec.
pub fn channel() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends "hand your connections over". `WouldBlock` when the channel is full.
pub fn send_hand_over(channel: BorrowedFd<'_>) -> io::Result<()> {
    send(channel, b"H", &[])
}

/// Sends "replace me". `WouldBlock` when the channel is full.
pub fn send_retire(channel: BorrowedFd<'_>) -> io::Result<()> {
    send(channel, b"R", &[])
}

/// Sends "stop" (graceful, or fast). `WouldBlock` when the channel is full.
pub fn send_stop(channel: BorrowedFd<'_>, fast: bool) -> io::Result<()> {
    send(channel, if fast { b"F" } else { b"S" }, &[])
}

/// What crosses the channel with a connection's record.
#[derive(Debug)]
pub struct Descriptors {
    /// The socket.
    pub stream: OwnedFd,
    /// The bytes read from it but not answered, if any.
    pub unread: Option<Unread>,
}

/// Bytes a client sent that one worker read and did not answer, on their
/// way to the worker that takes the connection over: a sealed memfd (no
/// size limit of the channel's, nothing written to disk).
#[derive(Debug)]
pub struct Unread(OwnedFd);

impl Unread {
    /// Puts `bytes` in a new sealed memfd.
    pub fn new(bytes: &[u8]) -> io::Result<Unread> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        use std::io::Write;
        let fd = memfd_create(
            c"nbnet-unread",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)?;
        // Sealed: the receiver reads exactly what was written.
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(seals)),
        )?;
        Ok(Unread(file.into()))
    }

    /// The bytes, if there are at most `max` of them.
    pub fn read(self, max: usize) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::from(self.0);
        let len = file.metadata()?.len();
        if len > max as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{len} unread bytes, more than the {max} one connection may hold in this worker (see max_buffered_bytes, max_pending_output_bytes, max_frame_bytes)"),
            ));
        }
        file.rewind()?;
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Its descriptor, to pass on.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }
}

/// Sends `conn` with its descriptor `fd` (which stays open here: the
/// receiver gets its own), and the bytes read from it but not answered.
/// `WouldBlock` when the channel is full: try again later, nothing was
/// sent.
pub fn send_connection(
    channel: BorrowedFd<'_>,
    conn: &Connection,
    fd: BorrowedFd<'_>,
    unread: Option<&Unread>,
) -> io::Result<()> {
    let mut record = Vec::with_capacity(16 + conn.listener.len() + conn.peer.len());
    record.push(b'C');
    record.push(match conn.kind {
        StreamKind::Tcp => 0,
        StreamKind::Unix => 1,
    });
    record.push(
        u8::from(conn.pipelining)
            | u8::from(conn.awaiting_proxy_header) << 1
            | u8::from(unread.is_some()) << 2,
    );
    record.extend_from_slice(&conn.id.to_le_bytes());
    for text in [&conn.listener, &conn.peer] {
        // Addresses are short; a longer one is cut (it is only shown).
        let bytes = &text.as_bytes()[..text.len().min(4096)];
        record.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        record.extend_from_slice(bytes);
    }
    match unread {
        None => send(channel, &record, &[fd.as_raw_fd()]),
        Some(unread) => send(
            channel,
            &record,
            &[fd.as_raw_fd(), unread.as_fd().as_raw_fd()],
        ),
    }
}

/// Sends "ready" with `version` (a new master to the old one).
pub fn send_ready(channel: BorrowedFd<'_>, version: &str) -> io::Result<()> {
    send(channel, &text_record(b'U', version), &[])
}

/// Sends "promoted" (the old master to the new one).
pub fn send_promoted(channel: BorrowedFd<'_>) -> io::Result<()> {
    send(channel, b"P", &[])
}

/// Sends "could not start: `why`".
pub fn send_failed(channel: BorrowedFd<'_>, why: &str) -> io::Result<()> {
    send(channel, &text_record(b'E', why), &[])
}

/// `tag` followed by `text`, cut to fit a record.
fn text_record(tag: u8, text: &str) -> Vec<u8> {
    let mut end = text.len().min(MAX_RECORD - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut record = Vec::with_capacity(1 + end);
    record.push(tag);
    record.extend_from_slice(&text.as_bytes()[..end]);
    record
}

fn send(channel: BorrowedFd<'_>, record: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<UnixAddr>(
            channel.as_raw_fd(),
            &[IoSlice::new(record)],
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one record. `Ok(None)`: the other end is gone. `WouldBlock`:
/// nothing waiting. A malformed record is skipped (its descriptor closed).
pub fn recv(channel: BorrowedFd<'_>) -> io::Result<Option<Message>> {
    loop {
        let mut buffer = [0u8; MAX_RECORD];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let (bytes, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let received = match recvmsg::<UnixAddr>(
                channel.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(received) => received,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            if let Ok(cmsgs) = received.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel just installed these descriptors
                        // in this process for us; nothing else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            let truncated = received.flags.contains(MsgFlags::MSG_CTRUNC);
            (received.bytes, fds, truncated)
        };
        if truncated {
            // The descriptor did not fit: the record's text says whose it was.
            let about: String = String::from_utf8_lossy(&buffer[..bytes.min(64)])
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            drop(fds);
            return Ok(Some(Message::Lost(about)));
        }
        if bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        match parse(&buffer[..bytes], fds) {
            Some(message) => return Ok(Some(message)),
            None => {
                tracing::warn!("malformed hand-over record ({bytes} bytes): dropped");
                continue;
            }
        }
    }
}

fn parse(record: &[u8], mut fds: Vec<OwnedFd>) -> Option<Message> {
    match record.first()? {
        b'H' if record.len() == 1 && fds.is_empty() => Some(Message::HandOver),
        b'R' if record.len() == 1 && fds.is_empty() => Some(Message::Retire),
        b'S' if record.len() == 1 && fds.is_empty() => Some(Message::Stop { fast: false }),
        b'F' if record.len() == 1 && fds.is_empty() => Some(Message::Stop { fast: true }),
        b'P' if record.len() == 1 && fds.is_empty() => Some(Message::Promoted),
        b'U' if fds.is_empty() => Some(Message::Ready(
            String::from_utf8_lossy(&record[1..]).into_owned(),
        )),
        b'E' if fds.is_empty() => Some(Message::Failed(
            String::from_utf8_lossy(&record[1..]).into_owned(),
        )),
        b'C' if fds.len() == 1 + usize::from(record.get(2)? & 4 != 0) => {
            let kind = match record.get(1)? {
                0 => StreamKind::Tcp,
                1 => StreamKind::Unix,
                _ => return None,
            };
            let flags = *record.get(2)?;
            let id = u64::from_le_bytes(record.get(3..11)?.try_into().ok()?);
            let mut rest = record.get(11..)?;
            let mut text = || -> Option<String> {
                let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
                let bytes = rest.get(2..2 + len)?;
                rest = &rest[2 + len..];
                String::from_utf8(bytes.to_vec()).ok()
            };
            let listener = text()?;
            let peer = text()?;
            let unread = match flags & 4 {
                0 => None,
                _ => Some(Unread(fds.pop()?)),
            };
            let fd = fds.pop()?;
            Some(Message::Connection(
                Connection {
                    kind,
                    id,
                    pipelining: flags & 1 != 0,
                    awaiting_proxy_header: flags & 2 != 0,
                    listener,
                    peer,
                },
                Descriptors { stream: fd, unread },
            ))
        }
        _ => None,
    }
}

/// Whether an I/O error means "not now": the channel is full or empty.
pub fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_connection_and_its_descriptor_cross_the_channel_whole() {
        let (master, worker) = channel().unwrap();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let conn = Connection {
            kind: StreamKind::Unix,
            id: 0x0123_4567_89ab_cdef,
            pipelining: true,
            awaiting_proxy_header: false,
            listener: "127.0.0.1:9000".into(),
            peer: "192.0.2.7:4242".into(),
        };
        send_connection(worker.as_fd(), &conn, theirs.as_fd(), None).unwrap();
        drop(theirs);
        let Some(Message::Connection(
            got,
            Descriptors {
                stream: fd,
                unread: None,
            },
        )) = recv(master.as_fd()).unwrap()
        else {
            panic!("expected a connection with nothing unread");
        };
        assert_eq!(got, conn);
        // The descriptor is the same socket: what one side writes, the
        // other reads.
        let mut moved = std::os::unix::net::UnixStream::from(fd);
        ours.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        moved.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // Nothing more: WouldBlock, then EOF once the sender is gone.
        assert!(would_block(&recv(master.as_fd()).unwrap_err()));
        send_hand_over(master.as_fd()).unwrap();
        assert!(matches!(
            recv(worker.as_fd()).unwrap(),
            Some(Message::HandOver)
        ));
        drop(worker);
        assert!(recv(master.as_fd()).unwrap().is_none());
    }

    #[test]
    fn unread_bytes_cross_the_channel_with_their_connection() {
        let (master, worker) = channel().unwrap();
        let (_ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let conn = Connection {
            kind: StreamKind::Tcp,
            id: 7,
            pipelining: false,
            awaiting_proxy_header: false,
            listener: "127.0.0.1:9000".into(),
            peer: "127.0.0.1:5555".into(),
        };
        let unread = Unread::new(b"0000000005hello00000000").unwrap();
        send_connection(worker.as_fd(), &conn, theirs.as_fd(), Some(&unread)).unwrap();
        let Some(Message::Connection(
            got,
            Descriptors {
                unread: Some(unread),
                ..
            },
        )) = recv(master.as_fd()).unwrap()
        else {
            panic!("expected a connection with unread bytes");
        };
        assert_eq!(got, conn);
        assert_eq!(unread.read(1024).unwrap(), b"0000000005hello00000000");
        // More than the receiver takes: refused, naming the limit.
        let big = Unread::new(&[b'0'; 100]).unwrap();
        let e = big.read(99).unwrap_err();
        assert!(e.to_string().contains("100 unread bytes"), "{e}");
        // A record that says bytes follow but carries one descriptor only.
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(parse(b"C\0\x04\0\0\0\0\0\0\0\0\0\0\0\0", vec![fd()]).is_none());
    }

    #[test]
    fn malformed_records_are_refused() {
        assert!(parse(b"", Vec::new()).is_none());
        assert!(parse(b"X", Vec::new()).is_none());
        assert!(parse(b"C\0\0", Vec::new()).is_none(), "no descriptor");
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(
            parse(b"C\x07\0\0\0\0\0\0\0\0\0\0\0\0\0", vec![fd()]).is_none(),
            "bad kind"
        );
        assert!(
            parse(b"C\0\0\0\0\0\0\0\0\0\0\x05\0ab", vec![fd()]).is_none(),
            "cut text"
        );
        assert!(parse(b"H", vec![fd()]).is_none(), "H carries no descriptor");
        assert!(parse(b"P", vec![fd()]).is_none(), "P carries no descriptor");
        assert!(parse(b"Pxyz", Vec::new()).is_none(), "P carries no text");
    }

    #[test]
    fn the_records_between_masters_cross_the_channel() {
        let (old, new) = channel().unwrap();
        send_ready(new.as_fd(), "nbnet 9.9.9, plugin ABI 1.2").unwrap();
        assert!(matches!(
            recv(old.as_fd()).unwrap(),
            Some(Message::Ready(v)) if v == "nbnet 9.9.9, plugin ABI 1.2"
        ));
        send_promoted(old.as_fd()).unwrap();
        assert!(matches!(
            recv(new.as_fd()).unwrap(),
            Some(Message::Promoted)
        ));
        // A reason too long for a record is cut at a character boundary.
        let long = "é".repeat(MAX_RECORD);
        send_failed(new.as_fd(), &long).unwrap();
        let Some(Message::Failed(why)) = recv(old.as_fd()).unwrap() else {
            panic!("expected Failed");
        };
        assert!(
            why.len() < MAX_RECORD && long.starts_with(&why),
            "{}",
            why.len()
        );
    }
}
