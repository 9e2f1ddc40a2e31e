//! The relay's splice: moves a tunnel's ciphertext between its two data
//! connections, holding a buffer only while bytes are in flight.
//!
//! `tokio::io::copy_bidirectional` keeps one buffer per direction for the
//! whole life of a tunnel, used or not: 128 KiB for every idle database
//! session the relay carries. Here each direction waits for readability
//! with no buffer, borrows one from a small per-thread pool for one read and
//! its writes, and gives it back, so an idle tunnel holds none and a busy
//! one at most one per direction. Pooled buffers were zero-filled once when
//! made and are never filled again.
//!
//! Semantics are those of `copy_bidirectional`: an end-of-stream in one
//! direction shuts down the write side of the other connection and the
//! other direction carries on; the splice ends when both directions have
//! ended, or at the first error (the caller then resets both connections).

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;

use tokio::net::TcpStream;

/// Most idle buffers each worker thread keeps for reuse; more are freed.
const POOLED_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Buffers taken and not given back on this thread (tests run the
    /// splice on a current-thread runtime).
    static IN_USE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A buffer of `size` bytes from this thread's pool (or a new one).
fn take(size: usize) -> Vec<u8> {
    #[cfg(test)]
    IN_USE.with(|n| n.set(n.get() + 1));
    POOL.with(|pool| pool.borrow_mut().pop())
        .filter(|buf| buf.len() == size)
        .unwrap_or_else(|| vec![0u8; size])
}

/// Gives `buf` back to the pool of the thread that runs this now.
fn give(buf: Vec<u8>) {
    #[cfg(test)]
    IN_USE.with(|n| n.set(n.get().saturating_sub(1)));
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED_PER_THREAD {
            pool.push(buf);
        }
    });
}

/// Copies `from` to `to` until `from` ends (then shuts down `to`'s write
/// side) or an error; returns the bytes copied.
async fn one_way(from: &TcpStream, to: &TcpStream, size: usize) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = take(size);
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                give(buf);
                // Half-close: the far end reads end-of-stream, and may still
                // answer. A peer already gone is not an error here.
                match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Err(e),
                }
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give(buf);
                continue;
            }
            Err(e) => {
                give(buf);
                return Err(e);
            }
        };
        let written = write_all(to, &buf[..n]).await;
        give(buf);
        written?;
        total += n as u64;
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Splices `a` and `b` both ways with buffers of `size` bytes held only
/// while bytes are in flight; returns the bytes copied a→b and b→a.
pub(crate) async fn splice(a: &TcpStream, b: &TcpStream, size: usize) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, size), one_way(b, a, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback TCP streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn carries_both_ways_and_half_closes() {
        // client_a ⇄ (relay_a ⇄ splice ⇄ relay_b) ⇄ client_b
        let (mut client_a, relay_a) = pair().await;
        let (mut client_b, relay_b) = pair().await;
        let spliced = tokio::spawn(async move { splice(&relay_a, &relay_b, 1024).await });

        // More than a buffer, to cross several reads.
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        client_a.write_all(&big).await.unwrap();
        let mut got = vec![0u8; big.len()];
        client_b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);

        // a closes its sending side; b still answers, then closes.
        client_a.shutdown().await.unwrap();
        let mut end = [0u8; 1];
        assert_eq!(
            client_b.read(&mut end).await.unwrap(),
            0,
            "b sees the half-close"
        );
        client_b
            .write_all(b"answer after the half-close")
            .await
            .unwrap();
        client_b.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client_a.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after the half-close");

        let (a_to_b, b_to_a) = spliced.await.unwrap().unwrap();
        assert_eq!((a_to_b, b_to_a), (10_000, 27));
    }

    #[tokio::test]
    async fn a_buffer_is_held_only_while_bytes_are_in_flight() {
        let (mut client_a, relay_a) = pair().await;
        let (mut client_b, relay_b) = pair().await;
        let spliced = tokio::spawn(async move { splice(&relay_a, &relay_b, 4096).await });
        let in_use = || IN_USE.with(std::cell::Cell::get);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(in_use(), 0, "an idle splice holds a buffer");

        // b does not read: a's bytes fill the sockets, and the one buffer
        // of that direction stays held while its write waits.
        let chunk = vec![7u8; 64 * 1024];
        let writer = tokio::spawn(async move {
            for _ in 0..256 {
                if client_a.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            client_a
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(in_use(), 1, "a blocked direction holds exactly one buffer");

        // Once b drains, nothing is held again.
        let mut sink = vec![0u8; 1 << 20];
        while tokio::time::timeout(
            std::time::Duration::from_millis(100),
            client_b.read(&mut sink),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|n| n > 0))
        {}
        let _client_a = writer.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(in_use(), 0, "a buffer outlived its bytes");
        spliced.abort();
    }

    #[tokio::test]
    async fn buffers_are_reused() {
        POOL.with(|pool| pool.borrow_mut().clear());
        let buf = take(4096);
        give(buf);
        assert_eq!(POOL.with(|pool| pool.borrow().len()), 1);
        let again = take(4096);
        assert_eq!(again.len(), 4096);
        assert_eq!(POOL.with(|pool| pool.borrow().len()), 0);
        // A buffer of another size is not handed out for this one.
        give(vec![0u8; 100]);
        assert_eq!(take(4096).len(), 4096);
    }
}
