//! Byte ranges: the single `Range: bytes=...` of a blob read, and the `Content-Range` of an
//! upload chunk.

use crate::error::{ErrorCode, OciError};

/// An inclusive byte range `[start, end]` that fits inside a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Resolves a `Range` header against a blob of `size` bytes (see [`RangeRequest`]).
    pub fn from_header(header: Option<&str>, size: u64) -> Result<Option<ByteRange>, OciError> {
        RangeRequest::resolve_opt(header.and_then(RangeRequest::parse).as_ref(), size)
    }

    /// Parses an upload chunk's `Content-Range: <start>-<end>` (the spec's form, no unit;
    /// `bytes ` and a `/total` suffix are tolerated as some clients send them).
    pub fn from_content_range(h: &str) -> Result<ByteRange, OciError> {
        let bad = || OciError::new(ErrorCode::BlobUploadInvalid, "malformed Content-Range");
        let h = h.trim();
        let h = h.strip_prefix("bytes ").unwrap_or(h);
        let h = h.split_once('/').map_or(h, |(r, _)| r);
        let (a, b) = h.split_once('-').ok_or_else(bad)?;
        let parse = |s: &str| -> Result<u64, OciError> {
            if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse().map_err(|_| bad())
        };
        let (start, end) = (parse(a)?, parse(b)?);
        if end < start {
            return Err(bad());
        }
        Ok(ByteRange { start, end })
    }
}

/// A blob read's `Range: bytes=...` as the client sent it, before the blob's size is known.
/// Parsed once where the request arrives; every source resolves it against its own size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// `bytes=start-` (`end` absent) or `bytes=start-end`.
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
    /// A `bytes=` range this server cannot satisfy whatever the size (malformed, several
    /// ranges, `-0`): a 416 once the size is known for its `Content-Range`.
    Unsatisfiable,
}

impl RangeRequest {
    /// Parses a `Range` header. `None` means "serve the whole blob": a unit other than
    /// bytes, which RFC 9110 says to ignore.
    pub fn parse(header: &str) -> Option<RangeRequest> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            // Several ranges are refused: blobs are served as one part only.
            return Some(RangeRequest::Unsatisfiable);
        }
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let Some((a, b)) = spec.split_once('-') else { return Some(RangeRequest::Unsatisfiable) };
        let parsed = if a.is_empty() {
            num(b).filter(|n| *n > 0).map(RangeRequest::Suffix)
        } else {
            match (num(a), b.is_empty()) {
                (Some(start), true) => Some(RangeRequest::From { start, end: None }),
                (Some(start), false) => {
                    num(b).filter(|end| *end >= start).map(|end| RangeRequest::From { start, end: Some(end) })
                }
                (None, _) => None,
            }
        };
        Some(parsed.unwrap_or(RangeRequest::Unsatisfiable))
    }

    /// The bytes of a blob of `size` this request asks for; a 416 carrying the blob's size
    /// when none of it can be served.
    pub fn resolve(&self, size: u64) -> Result<ByteRange, OciError> {
        let unsatisfiable = || {
            OciError::new(ErrorCode::RangeNotSatisfiable, "requested range not satisfiable")
                .with_header("content-range", format!("bytes */{size}"))
        };
        match *self {
            RangeRequest::Suffix(n) if size > 0 => Ok(ByteRange { start: size.saturating_sub(n), end: size - 1 }),
            RangeRequest::From { start, end } if start < size => {
                Ok(ByteRange { start, end: end.unwrap_or(u64::MAX).min(size - 1) })
            }
            _ => Err(unsatisfiable()),
        }
    }

    /// [`RangeRequest::resolve`] for an optional request: `None` serves the whole blob.
    pub fn resolve_opt(request: Option<&RangeRequest>, size: u64) -> Result<Option<ByteRange>, OciError> {
        request.map(|r| r.resolve(size)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(h: &str, size: u64) -> Result<Option<(u64, u64)>, ErrorCode> {
        ByteRange::from_header(Some(h), size).map(|o| o.map(|r| (r.start, r.end))).map_err(|e| e.code)
    }

    #[test]
    fn blob_ranges() {
        assert_eq!(r("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(r("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(r("bytes=90-1000", 100), Ok(Some((90, 99))));
        assert_eq!(r("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(r("bytes=-1000", 100), Ok(Some((0, 99))));
        assert_eq!(r("items=0-1", 100), Ok(None));
        for bad in [
            "bytes=100-",
            "bytes=5-4",
            "bytes=-0",
            "bytes=0-1,3-4",
            "bytes=a-b",
            "bytes=-",
            "bytes=-5-6",
            "bytes=99999999999999999999999-",
            "bytes=--1",
        ] {
            assert_eq!(r(bad, 100), Err(ErrorCode::RangeNotSatisfiable), "{bad}");
        }
        assert_eq!(r("bytes=0-", 0), Err(ErrorCode::RangeNotSatisfiable));
        let e = ByteRange::from_header(Some("bytes=200-"), 100).unwrap_err();
        assert_eq!(e.headers, vec![("content-range", "bytes */100".to_string())]);
    }

    #[test]
    fn upload_content_range() {
        assert_eq!(ByteRange::from_content_range("0-99").unwrap(), ByteRange { start: 0, end: 99 });
        assert_eq!(ByteRange::from_content_range("bytes 10-19/*").unwrap(), ByteRange { start: 10, end: 19 });
        for bad in ["", "5", "9-5", "-1-4", "a-b", "1-", "-"] {
            assert!(ByteRange::from_content_range(bad).is_err(), "{bad}");
        }
    }
}
