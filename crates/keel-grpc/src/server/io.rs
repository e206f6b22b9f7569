//! Accepted connections with a deadline on the HTTP/2 handshake, so a
//! client that never finishes its preface cannot hold a connection open.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The client preface (24 bytes) and the header of its SETTINGS frame
/// (9 bytes): once these arrived, the handshake is under way and HTTP/2
/// keepalive takes over.
const HANDSHAKE_BYTES: usize = 24 + 9;

pin_project! {
    /// A TCP connection whose first [`HANDSHAKE_BYTES`] must arrive
    /// within a deadline; reading fails with `TimedOut` after it.
    pub(crate) struct Deadlined {
        #[pin]
        stream: TcpStream,
        deadline: Option<Pin<Box<Sleep>>>,
        received: usize,
    }
}

impl Deadlined {
    fn new(stream: TcpStream, handshake_timeout: Duration) -> Self {
        Self {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            received: 0,
        }
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(deadline) = this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            tracing::debug!("closing a connection that did not finish its HTTP/2 handshake");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP/2 handshake not completed in time",
            )));
        }
        let before = buf.filled().len();
        let polled = this.stream.poll_read(cx, buf);
        if this.deadline.is_some() {
            *this.received += buf.filled().len() - before;
            if *this.received >= HANDSHAKE_BYTES {
                *this.deadline = None;
            }
        }
        polled
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Deadlined {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// The connections `listener` accepts, each with a handshake deadline.
pub(crate) fn incoming(
    listener: TcpListener,
    handshake_timeout: Duration,
) -> impl Stream<Item = io::Result<Deadlined>> + Send + 'static {
    futures::stream::unfold(listener, move |listener| async move {
        let accepted = match listener.accept().await {
            Ok((stream, _)) => {
                // Small unary replies should not wait for Nagle.
                let _ = stream.set_nodelay(true);
                Ok(Deadlined::new(stream, handshake_timeout))
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of
                // spinning on the error.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(error)
            }
        };
        Some((accepted, listener))
    })
}
