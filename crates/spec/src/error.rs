//! The one error table: every failure a client can see is an [`ErrorCode`] row with its OCI
//! code string and HTTP status, carried in an [`OciError`] with a message meant for humans.
//! Messages never contain internal paths or upstream bodies; those go to the log.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// The request path names no endpoint of the API.
    NotFound,
    /// `n` of a tags or catalog listing is not a number.
    PaginationNumberInvalid,
    /// A `Range` on a blob read that does not fit the blob.
    RangeNotSatisfiable,
    /// A chunk whose `Content-Range` does not start where the upload stands.
    UploadRangeInvalid,
    /// A manifest or upload over a configured size limit.
    TooLarge,
    /// A blob location document (Tessera's metadata-only push) that cannot be used.
    LocationInvalid,
    /// A simple signature (the signature extension's) that cannot be stored as sent.
    SignatureInvalid,
    Unavailable,
    Unknown,
}

impl ErrorCode {
    /// The row of the table: (code on the wire, HTTP status).
    pub const fn row(self) -> (&'static str, u16) {
        use ErrorCode::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", 404),
            BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", 400),
            BlobUploadUnknown => ("BLOB_UPLOAD_UNKNOWN", 404),
            DigestInvalid => ("DIGEST_INVALID", 400),
            ManifestBlobUnknown => ("MANIFEST_BLOB_UNKNOWN", 400),
            ManifestInvalid => ("MANIFEST_INVALID", 400),
            ManifestUnknown => ("MANIFEST_UNKNOWN", 404),
            NameInvalid => ("NAME_INVALID", 400),
            NameUnknown => ("NAME_UNKNOWN", 404),
            SizeInvalid => ("SIZE_INVALID", 400),
            TagInvalid => ("TAG_INVALID", 400),
            Unauthorized => ("UNAUTHORIZED", 401),
            Denied => ("DENIED", 403),
            Unsupported => ("UNSUPPORTED", 405),
            TooManyRequests => ("TOOMANYREQUESTS", 429),
            NotFound => ("NOT_FOUND", 404),
            PaginationNumberInvalid => ("PAGINATION_NUMBER_INVALID", 400),
            RangeNotSatisfiable => ("RANGE_INVALID", 416),
            UploadRangeInvalid => ("BLOB_UPLOAD_INVALID", 416),
            TooLarge => ("SIZE_INVALID", 413),
            LocationInvalid => ("BLOB_LOCATION_INVALID", 400),
            SignatureInvalid => ("SIGNATURE_INVALID", 400),
            Unavailable => ("UNAVAILABLE", 503),
            Unknown => ("UNKNOWN", 500),
        }
    }

    pub const fn code(self) -> &'static str {
        self.row().0
    }

    pub const fn status(self) -> u16 {
        self.row().1
    }
}

/// A client-visible failure. `headers` carries what the spec asks to accompany some codes
/// (`Range` on an out-of-order chunk, `Content-Range` on an unsatisfiable read, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct OciError {
    pub code: ErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    pub headers: Vec<(&'static str, String)>,
}

impl OciError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OciError { code, message: message.into(), detail: None, headers: Vec::new() }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// An internal failure: the cause is for the log, the client sees only a generic message.
    pub fn internal() -> Self {
        OciError::new(ErrorCode::Unknown, "internal error; see the server log")
    }

    /// The JSON body `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> serde_json::Value {
        let mut e = serde_json::json!({ "code": self.code.code(), "message": self.message });
        if let Some(d) = &self.detail {
            e["detail"] = d.clone();
        }
        serde_json::json!({ "errors": [e] })
    }
}

impl fmt::Display for OciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.code(), self.message)
    }
}

impl std::error::Error for OciError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_spec_shape() {
        let e = OciError::new(ErrorCode::BlobUnknown, "no such blob").with_detail(serde_json::json!({"digest": "x"}));
        let b = e.body();
        assert_eq!(b["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(b["errors"][0]["message"], "no such blob");
        assert_eq!(b["errors"][0]["detail"]["digest"], "x");
        assert_eq!(ErrorCode::BlobUnknown.status(), 404);
        assert_eq!(ErrorCode::ManifestBlobUnknown.status(), 400);
    }
}
