//! Body wrappers: a per-message size limit on requests, and responses that
//! end when the server aborts.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use keel_core::Error;
use pin_project_lite::pin_project;
use tonic::Status;
use tonic::body::Body;

/// The length of a gRPC message's prefix: a compression flag and a
/// big-endian 32-bit length.
const PREFIX_LEN: usize = 5;

pin_project! {
    /// A request body that fails with `RESOURCE_EXHAUSTED` as soon as a
    /// message prefix announces more than `limit` bytes, before the
    /// message is buffered.
    pub(crate) struct LimitedBody {
        #[pin]
        inner: Body,
        limit: usize,
        prefix: [u8; PREFIX_LEN],
        filled: usize,
        remaining: usize,
        failed: bool,
    }
}

impl LimitedBody {
    pub(crate) fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            limit,
            prefix: [0; PREFIX_LEN],
            filled: 0,
            remaining: 0,
            failed: false,
        }
    }
}

/// Walks the gRPC framing of `data`, checking each message prefix.
fn scan(
    mut data: &[u8],
    limit: usize,
    prefix: &mut [u8; PREFIX_LEN],
    filled: &mut usize,
    remaining: &mut usize,
) -> Result<(), Status> {
    while !data.is_empty() {
        if *remaining > 0 {
            let take = (*remaining).min(data.len());
            *remaining -= take;
            data.advance(take);
            continue;
        }
        prefix[*filled] = data[0];
        *filled += 1;
        data.advance(1);
        if *filled == PREFIX_LEN {
            *filled = 0;
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if len > limit {
                return Err(too_large(len, limit));
            }
            *remaining = len;
        }
    }
    Ok(())
}

fn too_large(len: usize, limit: usize) -> Status {
    let invalid = crate::status::render(&Error::invalid_input(
        "message",
        format!("a message of {len} bytes exceeds the limit of {limit} bytes"),
    ));
    // The gRPC convention for a message over the receiver's limit, with
    // Keel's code for refused input in the metadata.
    Status::with_metadata(
        tonic::Code::ResourceExhausted,
        invalid.message().to_owned(),
        invalid.metadata().clone(),
    )
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(status) = scan(data, *this.limit, this.prefix, this.filled, this.remaining)
        {
            *this.failed = true;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves when the server aborts.
type AbortSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

fn abort_signal(mut abort: tokio::sync::watch::Receiver<bool>) -> AbortSignal {
    Box::pin(async move {
        // A closed channel means the handle is gone: abort as well.
        let _ = abort.wait_for(|aborted| *aborted).await;
    })
}

/// The status of calls cut short by an abort.
pub(crate) fn aborted_status() -> Status {
    Status::unavailable("the server is shutting down")
}

pin_project! {
    /// A response body (a server stream, or a unary reply still being
    /// written) that ends with `UNAVAILABLE` trailers when the server
    /// aborts, so an abort does not wait for endless streams.
    pub(crate) struct AbortableBody {
        #[pin]
        inner: Body,
        abort: Option<AbortSignal>,
        trailers_sent: bool,
        ended: bool,
    }
}

impl AbortableBody {
    pub(crate) fn new(inner: Body, abort: tokio::sync::watch::Receiver<bool>) -> Self {
        let ended = inner.is_end_stream();
        Self {
            inner,
            abort: (!ended).then(|| abort_signal(abort)),
            trailers_sent: false,
            ended,
        }
    }
}

impl HttpBody for AbortableBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(abort) = this.abort
            && abort.as_mut().poll(cx).is_ready()
        {
            *this.ended = true;
            if *this.trailers_sent {
                return Poll::Ready(None);
            }
            let mut trailers = aborted_status().into_http::<()>().into_parts().0.headers;
            trailers.remove(http::header::CONTENT_TYPE);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_trailers() => *this.trailers_sent = true,
            None => *this.ended = true,
            _ => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32, payload: usize) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, payload));
        out
    }

    #[test]
    fn prefixes_are_checked_across_chunk_boundaries() {
        let mut stream = frame(3, 3);
        stream.extend(frame(4, 4));
        stream.extend(frame(11, 0));
        let (mut prefix, mut filled, mut remaining) = ([0; PREFIX_LEN], 0, 0);
        // Feed byte by byte: the third prefix (11 > 10) is refused.
        let mut refused = None;
        for (i, b) in stream.iter().enumerate() {
            if let Err(status) = scan(&[*b], 10, &mut prefix, &mut filled, &mut remaining) {
                refused = Some((i, status));
                break;
            }
        }
        let (at, status) = refused.expect("the oversized message is refused");
        assert_eq!(at, 8 + 9 + 4);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.metadata().get(crate::ERROR_CODE_KEY).unwrap(),
            "keel.invalid_input"
        );

        let (mut prefix, mut filled, mut remaining) = ([0; PREFIX_LEN], 0, 0);
        let ok = [frame(10, 10), frame(0, 0)].concat();
        assert!(scan(&ok, 10, &mut prefix, &mut filled, &mut remaining).is_ok());
        assert_eq!((filled, remaining), (0, 0));
    }
}
