//! What a client asks for beyond the path, as values: the media types it accepts and the
//! page of a listing it wants. Parsed once where the request arrives.

/// The media types of a request's `Accept` headers (parameters dropped). Empty admits all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accept(Vec<String>);

impl Accept {
    /// Admits every media type (no `Accept` header).
    pub fn any() -> Accept {
        Accept(Vec::new())
    }

    /// From every `Accept` header value of a request: clients may split the list over
    /// several headers.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Accept {
        Accept(
            values
                .into_iter()
                .flat_map(|v| v.split(','))
                .map(|t| t.split(';').next().unwrap_or("").trim())
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    /// Whether `media_type` may be answered. No header, or a wildcard, admits all.
    pub fn admits(&self, media_type: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|t| t == media_type || t == "*/*" || t == "application/*")
    }
}

/// Which page of a tags or catalog listing is asked for: at most `n` entries after `last`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Paging {
    pub n: Option<usize>,
    pub last: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_and_wildcards() {
        let a = Accept::parse(["application/vnd.oci.image.manifest.v1+json; q=0.9", " text/plain ,x/y"]);
        assert!(a.admits("application/vnd.oci.image.manifest.v1+json"));
        assert!(a.admits("x/y"));
        assert!(!a.admits("application/vnd.oci.image.index.v1+json"));
        assert!(Accept::any().admits("anything/at-all"));
        assert!(Accept::parse(["", " "]).admits("a/b"), "blank headers admit all");
        assert!(Accept::parse(["*/*"]).admits("a/b"));
        assert!(Accept::parse(["application/*"]).admits("application/json"));
    }
}
