//! Where a transfer's bytes come from: the [`ResponseData`] trait and ready-made sources.
//!
//! A source is read block by block on the event-loop thread, so `read` must not block for
//! long. A source that is not ready returns [`io::ErrorKind::WouldBlock`]: the session then
//! waits for it instead of failing. Dropping the source releases it (fbtftp's `close()`).

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;
use std::task::Poll;

use crate::handler::Reject;

/// The bytes of one transfer (fbtftp's `ResponseData`).
pub trait ResponseData {
    /// Reads up to `buf.len()` bytes. Short reads are fine; `Ok(0)` means the end of the
    /// data. `Err(WouldBlock)` means "not ready yet, ask again later".
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Reads into `bufs` in order, as [`read`](Self::read) would into one buffer made of
    /// them: the first is filled before anything goes into the second. Short reads are
    /// fine (`Ok(0)` is the end). A session with a window uses it to read several blocks
    /// with one call, straight into their packets. The default reads into the first
    /// non-empty buffer only; [`FileSource`] overrides it with one `readv`.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match bufs.iter_mut().find(|buf| !buf.is_empty()) {
            Some(buf) => self.read(buf),
            None => Ok(0),
        }
    }

    /// The total size in bytes, when known. It answers the `tsize` option; `None` leaves
    /// `tsize` out of the OACK.
    fn size(&self) -> Option<u64> {
        None
    }

    /// Whether the source is open yet: `Pending` holds the session's first answer (OACK or
    /// DATA 1) until the source is woken through the request's notifier and says `Ready`;
    /// `Ready(Err(reject))` refuses the request with that ERROR. Only a
    /// [`Deferred`](crate::deferred::Deferred) source is ever pending (see
    /// [`deferred`](crate::deferred)); a source wrapping another forwards this. The
    /// default is `Ready(Ok(()))`.
    fn poll_open(&mut self) -> Poll<Result<(), Reject>> {
        Poll::Ready(Ok(()))
    }
}

impl<R: ResponseData + ?Sized> ResponseData for Box<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read(buf)
    }
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        (**self).read_vectored(bufs)
    }
    fn size(&self) -> Option<u64> {
        (**self).size()
    }
    fn poll_open(&mut self) -> Poll<Result<(), Reject>> {
        (**self).poll_open()
    }
}

/// An in-memory buffer served from the start (shared, so one buffer can serve many
/// sessions).
#[derive(Clone, Debug)]
pub struct BytesSource {
    data: Arc<[u8]>,
    pos: usize,
}

impl BytesSource {
    /// A source over `data`.
    pub fn new(data: impl Into<Arc<[u8]>>) -> BytesSource {
        BytesSource {
            data: data.into(),
            pos: 0,
        }
    }
}

impl ResponseData for BytesSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }

    fn size(&self) -> Option<u64> {
        Some(self.data.len() as u64)
    }
}

/// An open file, with its size taken from its metadata when it is opened.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Wraps an open file.
    pub fn new(file: File) -> io::Result<FileSource> {
        let size = file.metadata()?.len();
        Ok(FileSource::with_size(file, size))
    }

    /// Wraps an open file whose size the caller has just read from its metadata (saves
    /// the `fstat` of [`new`](FileSource::new)).
    pub fn with_size(file: File, size: u64) -> FileSource {
        FileSource { file, size }
    }
}

impl ResponseData for FileSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        self.file.read_vectored(bufs)
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
}

/// Any [`io::Read`], size unknown (`tsize` is not answered).
#[derive(Debug)]
pub struct ReaderSource<R> {
    reader: R,
}

impl<R: Read> ReaderSource<R> {
    /// Wraps `reader`.
    pub fn new(reader: R) -> ReaderSource<R> {
        ReaderSource { reader }
    }
}

impl<R: Read> ResponseData for ReaderSource<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

/// Translates a source to netascii on the fly: LF becomes CR LF and a bare CR becomes
/// CR NUL (RFC 1350, RFC 764). Every source byte is translated, so an existing CR LF
/// becomes CR NUL CR LF, as in tftpd-hpa and fbtftp. The translated size is not known in
/// advance, so [`size`](ResponseData::size) is `None`.
#[derive(Debug)]
pub struct Netascii<R> {
    inner: R,
    /// Second byte of a pair that did not fit in the caller's buffer.
    pending: Option<u8>,
    /// Raw bytes read from `inner`, not yet translated.
    raw: Vec<u8>,
    raw_pos: usize,
    /// An error from `inner` that came after some bytes were already translated: those
    /// bytes are returned first, the error on the next call.
    deferred: Option<io::Error>,
}

impl<R: ResponseData> Netascii<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Netascii<R> {
        Netascii {
            inner,
            pending: None,
            raw: Vec::new(),
            raw_pos: 0,
            deferred: None,
        }
    }
}

impl<R: ResponseData> ResponseData for Netascii<R> {
    fn poll_open(&mut self) -> Poll<Result<(), Reject>> {
        self.inner.poll_open()
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut n = 0;
        if let Some(byte) = self.pending.take() {
            buf[0] = byte;
            n = 1;
        }
        while n < buf.len() {
            if self.raw_pos == self.raw.len() {
                // At most one raw byte per output byte is needed.
                self.raw.resize(buf.len() - n, 0);
                self.raw_pos = 0;
                let got = match self.inner.read(&mut self.raw) {
                    Ok(got) => got.min(self.raw.len()),
                    Err(e) => {
                        self.raw.clear();
                        if n == 0 {
                            return Err(e);
                        }
                        // Never lose what is already translated. WouldBlock and
                        // Interrupted come back by themselves on the next call; a hard
                        // error is kept for it.
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) {
                            self.deferred = Some(e);
                        }
                        break;
                    }
                };
                self.raw.truncate(got);
                if got == 0 {
                    break;
                }
            }
            let byte = self.raw[self.raw_pos];
            self.raw_pos += 1;
            let pair = match byte {
                b'\n' => Some(b'\n'),
                b'\r' => Some(0),
                _ => None,
            };
            match pair {
                None => {
                    buf[n] = byte;
                    n += 1;
                }
                Some(second) => {
                    buf[n] = b'\r';
                    n += 1;
                    match buf.get_mut(n) {
                        Some(slot) => {
                            *slot = second;
                            n += 1;
                        }
                        None => self.pending = Some(second),
                    }
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a source to the end with buffers of `chunk` bytes.
    fn drain(source: &mut dyn ResponseData, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            match source.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    fn netascii(input: &[u8], chunk: usize) -> Vec<u8> {
        drain(&mut Netascii::new(BytesSource::new(input.to_vec())), chunk)
    }

    #[test]
    fn netascii_vectors() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"abc", b"abc"),
            (b"a\nb", b"a\r\nb"),
            (b"a\rb", b"a\r\0b"),
            (b"a\r\nb", b"a\r\0\r\nb"),
            (b"\n\n", b"\r\n\r\n"),
            (b"\r", b"\r\0"),
            (b"a\nb\r\nc\rd", b"a\r\nb\r\0\r\nc\r\0d"),
        ];
        for (input, want) in cases {
            for chunk in [1, 2, 3, 7, 512] {
                assert_eq!(netascii(input, chunk), *want, "{input:?} chunk {chunk}");
            }
        }
    }

    #[test]
    fn netascii_cr_at_a_block_boundary() {
        // 511 plain bytes then CR: the CR lands at the end of a 512-byte block and its NUL
        // must open the next block.
        let mut input = vec![b'x'; 511];
        input.push(b'\r');
        input.push(b'y');
        let mut src = Netascii::new(BytesSource::new(input));
        let mut block = [0u8; 512];
        assert_eq!(src.read(&mut block).unwrap(), 512);
        assert_eq!(block[511], b'\r');
        assert_eq!(src.read(&mut block).unwrap(), 2);
        assert_eq!(&block[..2], b"\0y");
        assert_eq!(src.read(&mut block).unwrap(), 0);
        assert_eq!(src.size(), None);
    }

    /// A source that yields WouldBlock every other call.
    struct Flaky {
        inner: BytesSource,
        ready: bool,
    }

    impl ResponseData for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.ready = !self.ready;
            if self.ready {
                let n = buf.len().min(3);
                self.inner.read(&mut buf[..n])
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    #[test]
    fn netascii_passes_would_block_through_without_losing_bytes() {
        let input = b"line one\nline two\r\nend\r".repeat(20);
        let mut src = Netascii::new(Flaky {
            inner: BytesSource::new(input.clone()),
            ready: false,
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 5];
        let mut blocked = 0;
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(blocked > 0);
        assert_eq!(out, netascii(&input, 512));
    }

    /// Yields `chunks` one read at a time, then the error kinds in `then`, then the end.
    struct Script {
        chunks: Vec<&'static [u8]>,
        then: Vec<io::ErrorKind>,
    }

    impl ResponseData for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.chunks.is_empty() {
                let chunk = self.chunks.remove(0);
                buf[..chunk.len()].copy_from_slice(chunk);
                return Ok(chunk.len());
            }
            match self.then.pop() {
                Some(kind) => Err(kind.into()),
                None => Ok(0),
            }
        }
    }

    #[test]
    fn netascii_keeps_translated_bytes_when_the_source_errors_midway() {
        for kind in [
            io::ErrorKind::Interrupted,
            io::ErrorKind::WouldBlock,
            io::ErrorKind::Other,
        ] {
            let mut src = Netascii::new(Script {
                chunks: vec![b"a\n"],
                then: vec![kind],
            });
            let mut buf = [0u8; 16];
            assert_eq!(src.read(&mut buf).unwrap(), 3, "{kind:?}");
            assert_eq!(&buf[..3], b"a\r\n");
            if kind == io::ErrorKind::Other {
                // A hard error is reported on the next call, after the bytes.
                assert_eq!(src.read(&mut buf).unwrap_err().kind(), kind);
            }
            // (A transient error was used up by the script; a real source repeats it.)
            assert_eq!(src.read(&mut buf).unwrap(), 0, "{kind:?}");
        }
    }

    #[test]
    fn sources_report_sizes() {
        let mut bytes = BytesSource::new(&b"hello"[..]);
        assert_eq!(bytes.size(), Some(5));
        assert_eq!(drain(&mut bytes, 2), b"hello");
        let mut reader = ReaderSource::new(&b"abc"[..]);
        assert_eq!(reader.size(), None);
        assert_eq!(drain(&mut reader, 1), b"abc");
        let dir = std::env::temp_dir().join(format!("dyntftp-response-{}", std::process::id()));
        std::fs::write(&dir, b"file bytes").unwrap();
        let mut file = FileSource::new(File::open(&dir).unwrap()).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(file.size(), Some(10));
        assert_eq!(drain(&mut file, 4), b"file bytes");
    }
}
