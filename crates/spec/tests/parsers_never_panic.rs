//! Every parser a client can reach takes arbitrary input without panicking, and accepts
//! what the spec's grammar generates.

use proptest::prelude::*;
use tessera_spec::{ByteRange, Digest, ParsedManifest, Reference, RepoName, Tag};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings_never_panic(s in ".{0,300}") {
        let _ = s.parse::<RepoName>();
        let _ = s.parse::<Tag>();
        let _ = s.parse::<Digest>();
        let _ = s.parse::<Reference>();
        let _ = ByteRange::from_header(Some(&s), 1000);
        let _ = ByteRange::from_header(Some(&s), 0);
        let _ = ByteRange::from_content_range(&s);
        let _ = ParsedManifest::parse(Some(&s), s.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_as_manifest_never_panic(b in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = ParsedManifest::parse(None, &b);
    }

    #[test]
    fn grammar_names_are_accepted(name in "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}(/[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}){0,4}") {
        prop_assume!(name.len() <= 255);
        prop_assert_eq!(name.parse::<RepoName>().unwrap().to_string(), name);
    }

    #[test]
    fn grammar_tags_are_accepted(tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
        prop_assert_eq!(tag.parse::<Tag>().unwrap().to_string(), tag);
    }

    #[test]
    fn digests_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        let d = Digest::sha256_of(&bytes);
        prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn satisfiable_ranges_fit_the_blob(start in 0u64..2000, end in 0u64..2000, size in 1u64..1500) {
        if let Ok(Some(r)) = ByteRange::from_header(Some(&format!("bytes={start}-{end}")), size) {
            prop_assert!(r.start <= r.end && r.end < size);
        }
        if let Ok(Some(r)) = ByteRange::from_header(Some(&format!("bytes=-{end}")), size) {
            prop_assert!(r.start <= r.end && r.end < size);
        }
    }
}
