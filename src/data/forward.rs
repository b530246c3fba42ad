//! Forwarding: bytes copied unchanged both ways, a FIN passed on as a FIN
//! while the other direction keeps flowing, bytes counted as they pass.
//!
//! Both plaintext and TLS wait for data before they borrow a buffer from a
//! per-thread pool, and give it back once it is written, so an idle
//! connection holds no buffer at all; a plaintext bulk transfer switches to
//! splice(2) and skips user space entirely.

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use prometheus::IntCounter;
use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Size of one in-flight chunk.
const CHUNK: usize = 64 * 1024;
/// Bytes moved per splice: a pipe's default capacity (16 pages).
const PIPE_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread for reuse.
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; CHUNK].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_PER_THREAD {
            p.push(buf);
        }
    });
}

/// Last time (ms on the daemon's clock) any byte moved; read by the idle timer.
#[derive(Default)]
pub struct Activity(AtomicU64);

impl Activity {
    pub fn touch(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::Relaxed);
    }

    pub fn last(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One direction's counters: the deployment's metric and the connection's own.
#[derive(Clone, Copy)]
pub struct Counter<'a> {
    pub metric: &'a IntCounter,
    pub conn: &'a AtomicU64,
}

impl Counter<'_> {
    fn add(&self, n: u64) {
        self.metric.inc_by(n);
        self.conn.fetch_add(n, Ordering::Relaxed);
    }
}

/// Per-direction counters and the activity clock.
pub struct Meter<'a> {
    pub to_upstream: Counter<'a>,
    pub to_client: Counter<'a>,
    pub activity: &'a Activity,
    pub clock: &'a (dyn Fn() -> u64 + Sync),
}

impl Meter<'_> {
    /// `n` bytes moved one way: counted, and the connection is not idle.
    fn moved(&self, counter: Counter<'_>, n: usize) {
        counter.add(n as u64);
        self.activity.touch((self.clock)());
    }
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Forwards between two plaintext sockets until both directions are done.
/// `prefix`: bytes set-up already read from the client, sent on first.
pub async fn plain(
    client: &mut TcpStream,
    prefix: &[u8],
    upstream: &mut TcpStream,
    m: &Meter<'_>,
) -> io::Result<Totals> {
    let (cr, cw) = client.split();
    let (ur, mut uw) = upstream.split();
    if !prefix.is_empty() {
        uw.write_all(prefix).await?;
        m.to_upstream.add(prefix.len() as u64);
    }
    let up = pump_plain(cr, uw, m.to_upstream, m);
    let down = pump_plain(ur, cw, m.to_client, m);
    let (to_upstream, to_client) = tokio::try_join!(up, down)?;
    Ok(Totals {
        to_upstream: to_upstream + prefix.len() as u64,
        to_client,
    })
}

/// Waits for readiness before taking a buffer, so an idle direction holds
/// none. Reads through `AsyncRead`, which notes a short read as "drained"
/// and so saves the extra read that would only say `EAGAIN`. A direction
/// whose read fills a whole chunk is a bulk transfer: it switches to
/// splice(2) through a pipe of its own, so its bytes no longer cross user space.
async fn pump_plain(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: Counter<'_>,
    m: &Meter<'_>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    loop {
        let n = match pipe.as_mut() {
            // Boxed: only bulk transfers pay for the splice state.
            Some(p) => Box::pin(p.splice(from.as_ref(), to.as_ref())).await?,
            None => {
                from.readable().await?;
                let mut buf = take_buf();
                let read = from.read(&mut buf).await;
                let n = match read {
                    Ok(n) if n > 0 => to.write_all(&buf[..n]).await.map(|_| n),
                    other => other,
                };
                give_buf(buf);
                let n = n?;
                if n == CHUNK {
                    pipe = Pipe::new().ok();
                }
                n
            }
        };
        if n == 0 {
            // Pass the FIN on; the other direction keeps flowing.
            let _ = to.shutdown().await;
            return Ok(total);
        }
        total += n as u64;
        m.moved(counter, n);
    }
}

/// A pipe for splice(2): socket → pipe → socket, without a user-space copy.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }

    /// Moves what `from` has (up to a pipe's worth) into `to`; 0 at EOF.
    async fn splice(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let n = loop {
            from.readable().await?;
            // The pipe is empty here, so EAGAIN means the socket is drained.
            match from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, &self.write, None, PIPE_SIZE, flags)?)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(&self.read, None, to, None, left, flags)?)
            }) {
                Ok(w) => left -= w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// Forwards between a terminated TLS stream and the plaintext upstream.
pub async fn stream<C>(client: C, upstream: &mut TcpStream, m: &Meter<'_>) -> io::Result<Totals>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (ur, mut uw) = upstream.split();
    let up = pump_from_tls(&mut cr, &mut uw, m.to_upstream, m);
    let down = pump_to_tls(ur, &mut cw, m.to_client, m);
    let (to_upstream, to_client) = tokio::try_join!(up, down)?;
    Ok(Totals {
        to_upstream,
        to_client,
    })
}

/// Client (TLS) to upstream. Waits on a one-byte read, so an idle
/// connection holds no buffer; then takes a pooled buffer and adds whatever
/// else the TLS session has ready at once.
async fn pump_from_tls<R, W>(
    r: &mut R,
    w: &mut W,
    counter: Counter<'_>,
    m: &Meter<'_>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let mut first = [0u8; 1];
        let mut n = tls_read(r.read(&mut first).await)?;
        let mut eof = n == 0;
        if n > 0 {
            let mut buf = take_buf();
            buf[0] = first[0];
            while n < buf.len() {
                match read_ready(r, &mut buf[n..]).await {
                    Some(Ok(0)) => {
                        eof = true;
                        break;
                    }
                    Some(read) => n += tls_read(read)?,
                    None => break,
                }
            }
            let written = w.write_all(&buf[..n]).await;
            give_buf(buf);
            written?;
            w.flush().await?;
            total += n as u64;
            m.moved(counter, n);
        }
        if eof {
            let _ = w.shutdown().await;
            return Ok(total);
        }
    }
}

/// A TLS peer that closes without close_notify: treat it as a FIN.
fn tls_read(r: io::Result<usize>) -> io::Result<usize> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

/// Reads what `r` has ready now; None when it would wait.
async fn read_ready<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Option<io::Result<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = tokio::io::ReadBuf::new(buf);
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
            std::task::Poll::Ready(Err(e)) => Some(Err(e)),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Upstream (plaintext) to the TLS client: waits for readiness before it
/// takes a buffer, as plaintext forwarding does.
async fn pump_to_tls<W>(
    mut from: ReadHalf<'_>,
    w: &mut W,
    counter: Counter<'_>,
    m: &Meter<'_>,
) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = take_buf();
        let n = match from.read(&mut buf).await {
            Ok(n) if n > 0 => match w.write_all(&buf[..n]).await {
                Ok(()) => Ok(n),
                Err(e) => Err(e),
            },
            other => other,
        };
        give_buf(buf);
        let n = n?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(total);
        }
        w.flush().await?;
        total += n as u64;
        m.moved(counter, n);
    }
}
