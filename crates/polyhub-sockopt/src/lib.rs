//! Socket options that polyhub sets and that neither `std`, `tokio` nor `socket2` expose.
//!
//! The workspace forbids unsafe code everywhere else; this crate holds the few `setsockopt`
//! calls needed, each behind a safe function over a borrowed file descriptor, so that the
//! unsafe surface is one small file that says why each call is sound.
//!
//! Layout: one function per option, Linux only (elsewhere they report `Unsupported`).

use std::io;
use std::os::fd::AsFd;

/// Sets `SO_RCVLOWAT`: the kernel reports the socket readable (wakes `epoll`) only once at
/// least `bytes` are queued, or at end of stream, or on an error. A non-blocking read still
/// returns whatever is queued. Linux caps the value at half the largest receive buffer.
pub fn set_receive_low_water_mark(socket: &impl AsFd, bytes: u32) -> io::Result<()> {
    set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

#[cfg(target_os = "linux")]
fn set_int_option(
    socket: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let value = libc::c_int::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket option out of range"))?;
    let fd = socket.as_fd();
    #[allow(unsafe_code)]
    // SAFETY: `fd` is borrowed, so it stays open for the call; the option value is a live
    // `c_int` whose exact size is passed, and the kernel only reads it.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_int_option(
    _socket: &impl AsFd,
    _level: libc::c_int,
    _name: libc::c_int,
    _value: u32,
) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "socket option not supported on this system",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair; the server side's readiness is what the kernel says (tokio takes a
    /// new socket to be readable until a read finds nothing).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let nothing_yet = server.try_read(&mut [0; 16]).unwrap_err();
        assert_eq!(nothing_yet.kind(), io::ErrorKind::WouldBlock);
        (server, client)
    }

    async fn becomes_readable(stream: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_millis(200), stream.readable())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_socket_below_its_low_water_mark_does_not_wake_the_reader() {
        let (server, mut client) = pair().await;
        set_receive_low_water_mark(&server, 16).unwrap();
        client.write_all(&[1; 4]).await.unwrap();
        assert!(!becomes_readable(&server).await, "4 of 16 bytes woke it");
        client.write_all(&[2; 12]).await.unwrap();
        assert!(becomes_readable(&server).await, "16 of 16 bytes did not");
    }

    #[test]
    fn a_non_blocking_read_below_the_mark_still_returns_what_is_queued() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        set_receive_low_water_mark(&server, 1024).unwrap();
        server.set_nonblocking(true).unwrap();
        client.write_all(b"ack!").unwrap();
        let mut buf = [0; 64];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let read = loop {
            match (&server).read(&mut buf) {
                Ok(read) => break read,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "nothing arrived");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(error) => panic!("{error}"),
            }
        };
        assert_eq!(&buf[..read], b"ack!");
    }

    #[tokio::test]
    async fn the_end_of_the_stream_wakes_the_reader_below_the_mark() {
        let (server, client) = pair().await;
        set_receive_low_water_mark(&server, 1024).unwrap();
        drop(client);
        assert!(becomes_readable(&server).await);
    }

    #[tokio::test]
    async fn lowering_the_mark_again_wakes_for_what_is_already_queued() {
        let (server, mut client) = pair().await;
        set_receive_low_water_mark(&server, 1024).unwrap();
        client.write_all(b"ack!").await.unwrap();
        assert!(!becomes_readable(&server).await);
        set_receive_low_water_mark(&server, 1).unwrap();
        assert!(becomes_readable(&server).await);
    }
}
