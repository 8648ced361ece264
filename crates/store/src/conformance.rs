//! The shared conformance suites. Every [`BlobStore`] and [`MetaStore`] backend (and every
//! wrapper around one) calls these from its tests; a backend is correct when they pass.
//! They panic with a message on the first broken promise.

use std::io;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use tessera_spec::{Digest, RepoName, Tag};

use crate::{AppendError, BlobStore, ByteStream, ManifestRecord, MetaStore, StoreError, UploadId};

fn chunks(parts: Vec<Vec<u8>>) -> ByteStream<'static> {
    Box::pin(futures_util::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p)))))
}

async fn collect(s: ByteStream<'_>) -> Vec<u8> {
    s.try_fold(Vec::new(), |mut acc, b| async move {
        acc.extend_from_slice(&b);
        Ok(acc)
    })
    .await
    .expect("read stream")
}

/// Runs every BlobStore promise against `store`, which must start empty.
pub async fn blob_store(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = Digest::sha256_of(&data);
    assert_eq!(store.stat(&digest).await.unwrap(), None, "empty store has no blob");
    assert!(store.read(&digest, None).await.unwrap().is_none());

    // Chunked appends accumulate; the reported size is what was written.
    let id = UploadId::random();
    store.upload_create(&id).await.unwrap();
    assert_eq!(store.upload_size(&id).await.unwrap(), Some(0));
    let (a, b) = data.split_at(1_234_567);
    assert_eq!(
        store.upload_append(&id, chunks(vec![a[..10].to_vec(), a[10..].to_vec()]), true).await.unwrap(),
        a.len() as u64
    );
    // Not durable yet: readable all the same, and made durable by the commit.
    assert_eq!(store.upload_append(&id, chunks(vec![b.to_vec()]), false).await.unwrap(), data.len() as u64);
    assert_eq!(collect(store.upload_read(&id, 0).await.unwrap()).await, data, "upload_read returns what was appended");
    assert_eq!(
        collect(store.upload_read(&id, 1_000_000).await.unwrap()).await,
        &data[1_000_000..],
        "and from an offset"
    );
    assert!(collect(store.upload_read(&id, 5_000_000).await.unwrap()).await.is_empty(), "past the end: nothing");
    assert_eq!(store.stat(&digest).await.unwrap(), None, "nothing visible before commit");
    store.upload_commit(&id, &digest).await.unwrap();
    assert_eq!(store.upload_size(&id).await.unwrap(), None, "commit ends the session");
    assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1, "list shows committed blobs only");
    assert_eq!((listed[0].digest.clone(), listed[0].size), (digest.clone(), data.len() as u64));

    // Whole and ranged reads.
    let whole = store.read(&digest, None).await.unwrap().unwrap();
    assert_eq!(whole.len, data.len() as u64);
    assert_eq!(collect(whole.body).await, data);
    let part = store.read(&digest, Some((1_000_000, 2_500_000))).await.unwrap().unwrap();
    assert_eq!(part.len, 1_500_001);
    assert_eq!(collect(part.body).await, &data[1_000_000..=2_500_000]);
    let tail = store.read(&digest, Some((2_999_990, u64::MAX))).await.unwrap().unwrap();
    assert_eq!(collect(tail.body).await, &data[2_999_990..]);
    assert!(store.read(&digest, Some((3_000_000, 3_000_001))).await.is_err(), "range past the end is refused");

    // Many tiny chunks (more than a vectored write may take at once), empty ones among
    // them, land whole and in order.
    let tiny = UploadId::random();
    store.upload_create(&tiny).await.unwrap();
    let parts: Vec<Vec<u8>> = data[..5000].chunks(3).flat_map(|c| [c.to_vec(), Vec::new()]).collect();
    assert_eq!(store.upload_append(&tiny, chunks(parts), false).await.unwrap(), 5000);
    assert_eq!(collect(store.upload_read(&tiny, 0).await.unwrap()).await, &data[..5000]);
    store.upload_delete(&tiny).await.unwrap();

    // A session keeps the last hash state saved for it, and loses it with the session.
    let saving = UploadId::random();
    store.upload_create(&saving).await.unwrap();
    assert_eq!(store.upload_load_hash(&saving).await.unwrap(), None);
    store.upload_save_hash(&saving, 10, b"sha256:first").await.unwrap();
    store.upload_save_hash(&saving, 20, b"sha256:second\n\0").await.unwrap();
    assert_eq!(store.upload_load_hash(&saving).await.unwrap(), Some((20, b"sha256:second\n\0".to_vec())));
    store.upload_delete(&saving).await.unwrap();
    assert_eq!(store.upload_load_hash(&saving).await.unwrap(), None);
    assert!(store.upload_save_hash(&saving, 1, b"x").await.is_err(), "no state for a session that is gone");

    // A second commit of the same digest keeps one copy and succeeds.
    let again = UploadId::random();
    store.upload_create(&again).await.unwrap();
    store.upload_append(&again, chunks(vec![data.clone()]), true).await.unwrap();
    store.upload_commit(&again, &digest).await.unwrap();
    assert_eq!(collect(store.read(&digest, None).await.unwrap().unwrap().body).await, data);

    // A failing source keeps what arrived before the failure.
    let broken = UploadId::random();
    store.upload_create(&broken).await.unwrap();
    let failing: ByteStream = Box::pin(
        futures_util::stream::iter(vec![Ok(Bytes::from_static(b"hello")), Err(io::Error::other("client went away"))])
            .chain(futures_util::stream::iter(vec![Ok(Bytes::from_static(b"never"))])),
    );
    match store.upload_append(&broken, failing, true).await {
        Err(AppendError::Source(_)) => {}
        other => panic!("expected a source error, got {other:?}"),
    }
    assert_eq!(store.upload_size(&broken).await.unwrap(), Some(5));
    let listed = store.upload_list().await.unwrap();
    assert!(listed.iter().any(|(i, _)| *i == broken), "open sessions are listed");
    store.upload_delete(&broken).await.unwrap();
    store.upload_delete(&broken).await.unwrap();
    assert_eq!(store.upload_size(&broken).await.unwrap(), None);

    // Empty blobs are blobs too.
    let empty = UploadId::random();
    store.upload_create(&empty).await.unwrap();
    let empty_digest = Digest::sha256_of(b"");
    store.upload_commit(&empty, &empty_digest).await.unwrap();
    let r = store.read(&empty_digest, None).await.unwrap().unwrap();
    assert_eq!(r.len, 0);

    assert!(store.delete(&digest).await.unwrap());
    assert!(!store.delete(&digest).await.unwrap());
    assert_eq!(store.stat(&digest).await.unwrap(), None);
    assert!(store.list().await.unwrap().iter().all(|b| b.digest != digest), "a deleted blob is not listed");

    // A small blob stored in one step: readable whole, no session left, and storing it
    // again keeps it as it is.
    let sessions = store.upload_list().await.unwrap().len();
    let small = Bytes::from_static(b"a small blob stored whole");
    let small_digest = Digest::sha256_of(&small);
    store.put_blob(&small_digest, small.clone()).await.unwrap();
    store.put_blob(&small_digest, small.clone()).await.unwrap();
    assert_eq!(store.stat(&small_digest).await.unwrap(), Some(small.len() as u64));
    assert_eq!(collect(store.read(&small_digest, None).await.unwrap().unwrap().body).await, small);
    assert_eq!(store.upload_list().await.unwrap().len(), sessions, "put_blob leaves no session behind");
}

fn manifest(n: u8, subject: Option<&Digest>) -> ManifestRecord {
    let bytes = Bytes::from(format!("{{\"n\":{n}}}"));
    ManifestRecord {
        digest: Digest::sha256_of(&bytes),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes,
        subject: subject.cloned(),
        artifact_type: Some(format!("application/x.test{n}")),
        annotations_json: Some(format!("{{\"n\":\"{n}\"}}")),
        blobs: Vec::new(),
        children: Vec::new(),
    }
}

/// Runs every MetaStore promise against `store`, which must start empty.
pub async fn meta_store(store: &dyn MetaStore) {
    let repo: RepoName = "conf/a".parse().unwrap();
    let other: RepoName = "conf/b".parse().unwrap();
    let blob = Digest::sha256_of(b"blob");

    // Links are per repository.
    assert_eq!(store.blob_link(&repo, &blob).await.unwrap(), None);
    assert_eq!(store.blob_known(&blob).await.unwrap(), None);
    store.link_blob(&repo, &blob, 4).await.unwrap();
    store.link_blob(&repo, &blob, 4).await.unwrap();
    assert_eq!(store.blob_link(&repo, &blob).await.unwrap(), Some(4));
    assert_eq!(store.blob_link(&other, &blob).await.unwrap(), None, "a link in one repository is not seen in another");
    assert_eq!(store.blob_known(&blob).await.unwrap(), Some(4));

    // Manifests, tags, tag moves.
    let m1 = manifest(1, None);
    let m2 = manifest(2, None);
    let v1: Tag = "v1".parse().unwrap();
    assert_eq!(store.list_tags(&other, None, 10).await.unwrap(), None, "unknown repository");
    store.put_manifest(&repo, &m1, Some(&v1)).await.unwrap();
    assert_eq!(store.get_manifest(&repo, &m1.digest).await.unwrap(), Some(m1.clone()));
    assert_eq!(store.get_manifest(&other, &m1.digest).await.unwrap(), None);
    assert_eq!(store.resolve_tag(&repo, &v1).await.unwrap(), Some(m1.digest.clone()));
    store.put_manifest(&repo, &m2, Some(&v1)).await.unwrap();
    assert_eq!(store.resolve_tag(&repo, &v1).await.unwrap(), Some(m2.digest.clone()), "a tag moves");
    store.put_manifest(&repo, &m1, None).await.unwrap();
    assert_eq!(store.get_manifest(&repo, &m1.digest).await.unwrap().unwrap().bytes, m1.bytes, "exact bytes kept");

    // Check times of tags, to the millisecond; unknown tags have none.
    assert_eq!(store.tag_checked(&repo, &v1).await.unwrap(), None);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
    store.set_tag_checked(&repo, &v1, at).await.unwrap();
    assert_eq!(store.tag_checked(&repo, &v1).await.unwrap(), Some(at));
    store.set_tag_checked(&repo, &"nope".parse().unwrap(), at).await.unwrap();
    assert_eq!(store.tag_checked(&repo, &"nope".parse().unwrap()).await.unwrap(), None);

    // Tag listing is lexical and paginated.
    for t in ["b", "a", "c", "a1"] {
        store.put_manifest(&repo, &m1, Some(&t.parse().unwrap())).await.unwrap();
    }
    let p = store.list_tags(&repo, None, 2).await.unwrap().unwrap();
    assert_eq!((p.items, p.more), (vec!["a".to_string(), "a1".into()], true));
    let p = store.list_tags(&repo, Some("a1"), 10).await.unwrap().unwrap();
    assert_eq!((p.items, p.more), (vec!["b".to_string(), "c".into(), "v1".into()], false));
    let p = store.list_tags(&repo, None, 0).await.unwrap().unwrap();
    assert!(p.items.is_empty() && p.more);

    // Links to bytes elsewhere: visible like any link, with their URLs and their own claimed
    // size; a local link stays local; bytes arriving make an external link local with the
    // verified size; once bytes are held, a conflicting claim is refused.
    assert_eq!(store.blob_urls(&repo, &blob).await.unwrap(), Vec::<String>::new());
    let urls = vec!["https://cdn.example/blobs/x".to_string()];
    store.link_external(&repo, &blob, 4, &urls).await.unwrap();
    assert_eq!(store.blob_urls(&repo, &blob).await.unwrap(), Vec::<String>::new(), "a local link stays local");
    let far = Digest::sha256_of(b"far");
    store.link_external(&repo, &far, 9, &urls).await.unwrap();
    assert_eq!(store.blob_link(&repo, &far).await.unwrap(), Some(9));
    assert_eq!(store.blob_urls(&repo, &far).await.unwrap(), urls);
    assert_eq!(store.blob_known(&far).await.unwrap(), None, "bytes elsewhere are not known here");
    let moved = vec!["https://cdn2.example/blobs/x".to_string()];
    store.link_external(&repo, &far, 9, &moved).await.unwrap();
    assert_eq!(store.blob_urls(&repo, &far).await.unwrap(), moved, "an external link can move");
    // Each link keeps its own claim: a wrong size in one repository changes nothing elsewhere.
    store.link_external(&other, &far, 10, &urls).await.unwrap();
    assert_eq!(store.blob_link(&other, &far).await.unwrap(), Some(10));
    assert_eq!(store.blob_link(&repo, &far).await.unwrap(), Some(9));
    // Bytes arriving (verified size 11) make the link local, with the true size.
    store.link_blob(&repo, &far, 11).await.unwrap();
    assert_eq!(store.blob_urls(&repo, &far).await.unwrap(), Vec::<String>::new(), "bytes arrived");
    assert_eq!(store.blob_link(&repo, &far).await.unwrap(), Some(11), "the verified size wins");
    assert_eq!(store.blob_link(&other, &far).await.unwrap(), Some(10));
    // Once bytes are held, a claim with another size is refused.
    let e = store.link_external(&other, &far, 12, &urls).await.unwrap_err();
    assert!(matches!(e, crate::StoreError::Contradicts(_)), "{e}");
    assert!(store.unlink_blob(&other, &far).await.unwrap());
    assert!(store.unlink_blob(&repo, &far).await.unwrap());

    // Catalog.
    store.link_blob(&other, &blob, 4).await.unwrap();
    let c = store.catalog(None, 1).await.unwrap();
    assert_eq!((c.items, c.more), (vec!["conf/a".to_string()], true));
    let c = store.catalog(Some("conf/a"), 10).await.unwrap();
    assert_eq!((c.items, c.more), (vec!["conf/b".to_string()], false));

    // Referrers: by subject, in push order, only in the same repository.
    let r1 = manifest(10, Some(&m1.digest));
    let r2 = manifest(11, Some(&m1.digest));
    store.put_manifest(&repo, &r1, None).await.unwrap();
    store.put_manifest(&repo, &r2, Some(&"sig".parse().unwrap())).await.unwrap();
    store.put_manifest(&other, &manifest(12, Some(&m1.digest)), None).await.unwrap();
    let refs = store.referrers(&repo, &m1.digest).await.unwrap();
    assert_eq!(refs.iter().map(|m| m.digest.clone()).collect::<Vec<_>>(), vec![r1.digest.clone(), r2.digest.clone()]);
    assert_eq!(refs[0].annotations_json.as_deref(), Some("{\"n\":\"10\"}"));

    // Deleting a manifest removes the tags on it; deleting a tag leaves the manifest.
    let mut removed = store.delete_manifest(&repo, &m1.digest).await.unwrap().unwrap();
    removed.sort();
    assert_eq!(removed.iter().map(|t| t.to_string()).collect::<Vec<_>>(), ["a", "a1", "b", "c"]);
    assert_eq!(store.get_manifest(&repo, &m1.digest).await.unwrap(), None);
    assert_eq!(store.resolve_tag(&repo, &"a".parse().unwrap()).await.unwrap(), None);
    assert_eq!(store.delete_manifest(&repo, &m1.digest).await.unwrap(), None);
    assert!(store.delete_tag(&repo, &v1).await.unwrap());
    assert!(!store.delete_tag(&repo, &v1).await.unwrap());
    assert_eq!(store.resolve_tag(&repo, &v1).await.unwrap(), None);
    assert!(store.get_manifest(&repo, &m2.digest).await.unwrap().is_some());

    // Unlinking.
    assert!(store.unlink_blob(&repo, &blob).await.unwrap());
    assert!(!store.unlink_blob(&repo, &blob).await.unwrap());
    assert_eq!(store.blob_link(&repo, &blob).await.unwrap(), None);
    assert_eq!(store.blob_known(&blob).await.unwrap(), Some(4), "still linked elsewhere");

    // Upload records.
    let id = UploadId::random();
    assert_eq!(store.upload_repo(&id).await.unwrap(), None);
    store.create_upload(&id, &repo).await.unwrap();
    assert_eq!(store.upload_repo(&id).await.unwrap(), Some(repo.clone()));
    store.delete_upload(&id).await.unwrap();
    assert_eq!(store.upload_repo(&id).await.unwrap(), None);

    // What repositories under a prefix hold: each blob once, bytes held here only, by
    // whole name components.
    let (team_a, team_b, beside): (RepoName, RepoName, RepoName) =
        ("zq/a".parse().unwrap(), "zq/b/sub".parse().unwrap(), "zqx/c".parse().unwrap());
    let (small, big, far) = (Digest::sha256_of(b"q-small"), Digest::sha256_of(b"q-big"), Digest::sha256_of(b"q-far"));
    store.link_blob(&team_a, &small, 4).await.unwrap();
    store.link_blob(&team_b, &small, 4).await.unwrap();
    store.link_blob(&team_b, &big, 1000).await.unwrap();
    store.link_blob(&beside, &big, 1000).await.unwrap();
    store.link_external(&team_a, &far, 9, &["https://cdn.example/q".to_string()]).await.unwrap();
    assert_eq!(store.bytes_under("zq").await.unwrap(), 1004, "each blob once; bytes elsewhere not counted");
    assert_eq!(store.bytes_under("/zq/b/").await.unwrap(), 1004);
    assert_eq!(store.bytes_under("zq/a").await.unwrap(), 4);
    assert_eq!(store.bytes_under("z").await.unwrap(), 0, "whole components only");
    assert!(store.bytes_under("").await.unwrap() >= 1004);
    assert!(store.linked_under("zq", &big).await.unwrap());
    assert!(!store.linked_under("zq/a", &big).await.unwrap());
    assert!(!store.linked_under("zq", &far).await.unwrap(), "bytes elsewhere are not held under it");
    for (repo, digest) in [(&team_a, &small), (&team_b, &small), (&team_b, &big), (&beside, &big), (&team_a, &far)] {
        assert!(store.unlink_blob(repo, digest).await.unwrap());
    }
    assert_eq!(store.bytes_under("zq").await.unwrap(), 0);

    // Tags with when they were pushed; a tag is untagged only while it still points where
    // it was seen pointing.
    let (m1, m2) = (manifest(41, None), manifest(42, None));
    let (old, new): (Tag, Tag) = ("old".parse().unwrap(), "new".parse().unwrap());
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
    store.put_manifest(&team_a, &m1, Some(&old)).await.unwrap();
    store.put_manifest(&team_b, &m2, Some(&new)).await.unwrap();
    let tags = store.tags_under("zq").await.unwrap();
    assert_eq!(
        tags.iter().map(|t| (t.repo.as_str(), t.tag.as_str(), &t.digest)).collect::<Vec<_>>(),
        vec![("zq/a", "old", &m1.digest), ("zq/b/sub", "new", &m2.digest)]
    );
    assert!(tags.iter().all(|t| t.pushed > before && t.pushed <= std::time::SystemTime::now()));
    let pushed = tags[0].pushed;
    store.put_manifest(&team_a, &m1, Some(&old)).await.unwrap();
    assert_eq!(store.tags_under("zq/a").await.unwrap()[0].pushed, pushed, "the same manifest again is no new push");
    assert!(store.tags_under("zqx").await.unwrap().is_empty());
    assert!(!store.untag_if(&team_a, &old, &m2.digest).await.unwrap(), "moved since: kept");
    assert_eq!(store.resolve_tag(&team_a, &old).await.unwrap(), Some(m1.digest.clone()));
    assert!(store.untag_if(&team_a, &old, &m1.digest).await.unwrap());
    assert_eq!(store.resolve_tag(&team_a, &old).await.unwrap(), None);
    assert!(store.delete_manifest(&team_a, &m1.digest).await.unwrap().is_some());
    assert!(store.delete_manifest(&team_b, &m2.digest).await.unwrap().is_some());

    // Simple signatures: by repository and digest, in the order added; a name keeps its
    // content.
    let signed = Digest::sha256_of(b"signed manifest");
    assert!(store.signatures(&team_a, &signed).await.unwrap().is_empty());
    assert!(store.add_signature(&team_a, &signed, "s1", b"first").await.unwrap());
    assert!(store.add_signature(&team_a, &signed, "s2", b"second").await.unwrap());
    assert!(!store.add_signature(&team_a, &signed, "s1", b"first").await.unwrap(), "the same again");
    assert!(matches!(store.add_signature(&team_a, &signed, "s1", b"changed").await, Err(StoreError::Contradicts(_))));
    let kept = store.signatures(&team_a, &signed).await.unwrap();
    assert_eq!(
        kept,
        vec![("s1".to_string(), Bytes::from_static(b"first")), ("s2".to_string(), Bytes::from_static(b"second"))]
    );
    assert!(store.signatures(&team_b, &signed).await.unwrap().is_empty(), "per repository");

    // Vouches: by scope, name and digest, until their end; recording again sets a new end.
    let scope = "rule-1 route-2 blobs";
    let in_a_day = SystemTime::now() + Duration::from_secs(86_400);
    let (vouched, other) = (Digest::sha256_of(b"vouched blob"), Digest::sha256_of(b"another blob"));
    assert_eq!(store.vouched(scope, &team_a, &vouched).await.unwrap(), None);
    // A digest listed twice (an image repeating a layer) is recorded once.
    store.record_vouches(scope, &team_a, &[vouched.clone(), signed.clone(), vouched.clone()], in_a_day).await.unwrap();
    let until = store.vouched(scope, &team_a, &vouched).await.unwrap().expect("vouched");
    let off = until.duration_since(in_a_day).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_millis(2), "kept to the millisecond: {off:?}");
    assert!(store.vouched(scope, &team_a, &signed).await.unwrap().is_some());
    assert_eq!(store.vouched(scope, &team_a, &other).await.unwrap(), None);
    assert_eq!(store.vouched(scope, &team_b, &vouched).await.unwrap(), None, "per name");
    assert_eq!(store.vouched("rule-1 route-3 blobs", &team_a, &vouched).await.unwrap(), None, "per scope");
    assert_eq!(store.forget_vouches().await.unwrap(), 0, "none has ended");
    // Of two records, the later end holds (another pass needing the same blob); one
    // recorded with a near end alone ends then. Long enough that a slow machine reads it
    // before it ends.
    let moment = Duration::from_millis(500);
    store.record_vouches(scope, &team_a, std::slice::from_ref(&vouched), SystemTime::now() + moment).await.unwrap();
    assert!(store.vouched(scope, &team_a, &vouched).await.unwrap().is_some_and(|u| u >= in_a_day - moment));
    store.record_vouches(scope, &team_a, std::slice::from_ref(&other), SystemTime::now() + moment).await.unwrap();
    assert!(store.vouched(scope, &team_a, &other).await.unwrap().is_some_and(|u| u < in_a_day));
    tokio::time::sleep(moment * 2).await;
    assert_eq!(store.vouched(scope, &team_a, &other).await.unwrap(), None, "ended");
    assert!(store.vouched(scope, &team_a, &vouched).await.unwrap().is_some());
    assert_eq!(store.forget_vouches().await.unwrap(), 1, "the one that ended");
    assert!(store.vouched(scope, &team_a, &vouched).await.unwrap().is_some());
    assert!(store.vouched(scope, &team_a, &signed).await.unwrap().is_some());

    summaries(store).await;
    garbage_collection(store).await;
}

/// Repository summaries (paged, searched, with tag counts and bytes held) and tags by
/// recency, as the pages read them.
async fn summaries(store: &dyn MetaStore) {
    let (x, xy, z): (RepoName, RepoName, RepoName) =
        ("sum/x".parse().unwrap(), "sum/xy".parse().unwrap(), "sum/z".parse().unwrap());
    let (held, far) = (Digest::sha256_of(b"held by x"), Digest::sha256_of(b"far from x"));
    store.link_blob(&x, &held, 1000).await.unwrap();
    store.link_external(&x, &far, 5000, &["https://cdn.example/far".to_string()]).await.unwrap();
    let m = manifest(40, None);
    for tag in ["old", "mid", "new"] {
        store.put_manifest(&x, &m, Some(&tag.parse().unwrap())).await.unwrap();
        // Pushes a few milliseconds apart are told apart.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    store.put_manifest(&xy, &m, Some(&"only".parse().unwrap())).await.unwrap();
    store.link_blob(&z, &held, 1000).await.unwrap();

    let (first, more) = store.repository_summaries(None, "sum/", 2).await.unwrap();
    assert!(more);
    let names: Vec<&str> = first.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["sum/x", "sum/xy"]);
    assert_eq!((first[0].tags, first[0].bytes), (3, 1000), "bytes held here, not those elsewhere");
    assert_eq!((first[1].tags, first[1].bytes), (1, 0));
    assert!(first[0].pushed.is_some() && first[1].pushed.is_some());
    let (rest, more) = store.repository_summaries(Some("sum/xy"), "sum/", 2).await.unwrap();
    assert!(!more);
    assert_eq!(rest.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["sum/z"]);
    assert_eq!((rest[0].tags, rest[0].pushed), (0, None), "a repository without tags");
    let (found, _) = store.repository_summaries(None, "m/x", 10).await.unwrap();
    assert_eq!(found.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["sum/x", "sum/xy"], "contained anywhere");

    let recent = store.recent_tags(Some(&x), 0, 2).await.unwrap();
    assert_eq!(recent.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(), ["new", "mid"]);
    let recent = store.recent_tags(Some(&x), 2, 2).await.unwrap();
    assert_eq!(recent.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(), ["old"]);
    assert!(store.recent_tags(Some(&"sum/none".parse().unwrap()), 0, 2).await.unwrap().is_empty());
    store.put_manifest(&z, &m, Some(&"latest".parse().unwrap())).await.unwrap();
    let everywhere = store.recent_tags(None, 0, 2).await.unwrap();
    let seen: Vec<String> = everywhere.iter().map(|t| format!("{}:{}", t.repo, t.tag)).collect();
    assert_eq!(seen[0], "sum/z:latest", "every repository's, the newest first: {seen:?}");
}

/// The promises garbage collection rests on (see [`MetaStore::hold_blob`]).
async fn garbage_collection(store: &dyn MetaStore) {
    use std::time::{Duration, SystemTime};
    let repo: RepoName = "conf/gc".parse().unwrap();
    let (layer, config, loose) =
        (Digest::sha256_of(b"layer"), Digest::sha256_of(b"config"), Digest::sha256_of(b"loose"));
    let now = SystemTime::now();
    let later = now + Duration::from_secs(3600);
    let earlier = now - Duration::from_secs(3600);

    // A manifest whose blobs are not all linked is refused whole, in its transaction.
    let mut m = manifest(20, None);
    m.blobs = vec![config.clone(), layer.clone()];
    store.link_blob(&repo, &config, 6).await.unwrap();
    let e = store.put_manifest(&repo, &m, Some(&"t".parse().unwrap())).await.unwrap_err();
    assert!(matches!(e, crate::StoreError::Missing(_)), "{e}");
    assert_eq!(store.get_manifest(&repo, &m.digest).await.unwrap(), None, "nothing stored");
    assert_eq!(store.resolve_tag(&repo, &"t".parse().unwrap()).await.unwrap(), None, "no tag either");
    store.link_blob(&repo, &layer, 5).await.unwrap();
    store.link_blob(&repo, &loose, 5).await.unwrap();
    store.put_manifest(&repo, &m, Some(&"t".parse().unwrap())).await.unwrap();

    // Recent links stay whatever references them; old ones stay only if referenced.
    let removed = store.unlink_unreferenced(earlier).await.unwrap();
    assert!(!removed.iter().any(|(r, _)| r == &repo), "links younger than the cutoff stay: {removed:?}");
    let removed = store.unlink_unreferenced(later).await.unwrap();
    assert!(removed.contains(&(repo.clone(), loose.clone())), "{removed:?}");
    assert!(!removed.iter().any(|(r, d)| r == &repo && (d == &layer || d == &config)), "referenced links stay");
    assert_eq!(store.blob_link(&repo, &loose).await.unwrap(), None);
    assert_eq!(store.blob_link(&repo, &layer).await.unwrap(), Some(5));

    // Deleting the manifest drops its references.
    store.delete_manifest(&repo, &m.digest).await.unwrap();
    let removed = store.unlink_unreferenced(later).await.unwrap();
    assert!(removed.contains(&(repo.clone(), layer.clone())) && removed.contains(&(repo.clone(), config.clone())));

    // A blob held since the cutoff is not doomed; one nobody holds and nothing links is.
    assert!(store.hold_blob(&layer, 5).await.unwrap());
    let doomed = store.doom_unlinked(earlier, &[], usize::MAX).await.unwrap();
    assert!(!doomed.contains(&layer) && !doomed.contains(&loose), "held or unlinked since the cutoff: {doomed:?}");
    let orphan = Digest::sha256_of(b"orphan");
    let doomed = store.doom_unlinked(later, std::slice::from_ref(&orphan), usize::MAX).await.unwrap();
    for d in [&layer, &loose, &config, &orphan] {
        assert!(doomed.contains(d), "{d} doomed: {doomed:?}");
    }
    // Doomed blobs can be neither held nor linked until their bytes are gone.
    assert!(!store.hold_blob(&layer, 5).await.unwrap());
    assert!(matches!(store.link_blob(&repo, &layer, 5).await.unwrap_err(), crate::StoreError::Missing(_)));
    let urls = ["https://cdn.example/l".to_string()];
    assert!(matches!(store.link_external(&repo, &layer, 5, &urls).await.unwrap_err(), crate::StoreError::Missing(_)));
    assert!(
        store.doom_unlinked(SystemTime::UNIX_EPOCH, &[], usize::MAX).await.unwrap().contains(&layer),
        "leftovers are reported"
    );
    store.forget_doomed(&doomed).await.unwrap();
    assert!(store.doom_unlinked(SystemTime::UNIX_EPOCH, &[], usize::MAX).await.unwrap().is_empty());
    assert!(store.hold_blob(&layer, 5).await.unwrap());
    store.link_blob(&repo, &layer, 5).await.unwrap();
    assert_eq!(store.blob_link(&repo, &layer).await.unwrap(), Some(5));
    // Bytes with a record are never orphans.
    assert!(!store.doom_unlinked(later, std::slice::from_ref(&layer), usize::MAX).await.unwrap().contains(&layer));

    // Linking again makes a link young again (a push into a repository whose old image
    // was deleted gets the whole grace period).
    std::thread::sleep(Duration::from_millis(5));
    let between = SystemTime::now();
    std::thread::sleep(Duration::from_millis(5));
    store.link_blob(&repo, &layer, 5).await.unwrap();
    assert!(store.unlink_unreferenced(between).await.unwrap().is_empty());
    assert!(store.unlink_blob(&repo, &layer).await.unwrap());

    // At most `limit` unlinked blobs are doomed at once.
    for n in 0..3u8 {
        let d = Digest::sha256_of(&[b'g', n]);
        store.link_blob(&repo, &d, 2).await.unwrap();
        store.unlink_blob(&repo, &d).await.unwrap();
    }
    let first = store.doom_unlinked(later, &[], 2).await.unwrap();
    assert_eq!(first.len(), 2, "{first:?}");
    store.forget_doomed(&first).await.unwrap();
    let rest = store.doom_unlinked(later, &[], 2).await.unwrap();
    assert!(!rest.is_empty() && rest.iter().all(|d| !first.contains(d)), "{rest:?}");
    store.forget_doomed(&rest).await.unwrap();

    untagged_manifests(store).await;
}

/// What keeps a manifest when untagged manifests are collected: a tag, an index listing
/// it, a kept subject; and the push that lists a child checks it in its transaction.
async fn untagged_manifests(store: &dyn MetaStore) {
    use std::time::{Duration, SystemTime};
    let repo: RepoName = "conf/untagged".parse().unwrap();
    let tag = |t: &str| -> Tag { t.parse().unwrap() };
    let index = |n: u8, children: &[&ManifestRecord]| {
        let mut m = manifest(n, None);
        m.children = children.iter().map(|c| c.digest.clone()).collect();
        m
    };
    let (tagged, loose, child, kept_child) =
        (manifest(30, None), manifest(31, None), manifest(32, None), manifest(33, None));
    let (of_tagged, of_loose, of_nothing) = (
        manifest(34, Some(&tagged.digest)),
        manifest(35, Some(&loose.digest)),
        manifest(36, Some(&Digest::sha256_of(b"none"))),
    );
    let (loose_index, tagged_index) = (index(37, &[&child]), index(38, &[&kept_child]));

    // A child must be stored before the index that lists it.
    let e = store.put_manifest(&repo, &loose_index, None).await.unwrap_err();
    assert!(matches!(e, crate::StoreError::Missing(_)), "{e}");
    assert_eq!(store.get_manifest(&repo, &loose_index.digest).await.unwrap(), None);

    store.put_manifest(&repo, &tagged, Some(&tag("v1"))).await.unwrap();
    for m in [&loose, &child, &kept_child, &of_tagged, &of_loose, &of_nothing] {
        store.put_manifest(&repo, m, None).await.unwrap();
    }
    store.put_manifest(&repo, &loose_index, None).await.unwrap();
    store.put_manifest(&repo, &tagged_index, Some(&tag("multi"))).await.unwrap();

    // The indexes listing a manifest, for checks that follow an index's signature to it.
    assert_eq!(store.parents(&repo, &kept_child.digest, 16).await.unwrap(), vec![tagged_index.digest.clone()]);
    assert_eq!(store.parents(&repo, &tagged.digest, 16).await.unwrap(), Vec::<Digest>::new());
    let elsewhere: RepoName = "conf/elsewhere".parse().unwrap();
    assert!(store.parents(&elsewhere, &kept_child.digest, 16).await.unwrap().is_empty(), "per repository");

    let in_repo = |deleted: Vec<(RepoName, Digest)>| -> Vec<Digest> {
        let mut d: Vec<Digest> = deleted.into_iter().filter(|(r, _)| r == &repo).map(|(_, d)| d).collect();
        d.sort();
        d
    };
    let earlier = SystemTime::now() - Duration::from_secs(3600);
    assert!(in_repo(store.delete_untagged(earlier).await.unwrap()).is_empty(), "young manifests stay");
    let deleted = in_repo(store.delete_untagged(SystemTime::now() + Duration::from_secs(3600)).await.unwrap());
    let mut expected: Vec<Digest> =
        [&loose, &child, &of_loose, &of_nothing, &loose_index].iter().map(|m| m.digest.clone()).collect();
    expected.sort();
    assert_eq!(deleted, expected, "untagged, unlisted, and referrers of nothing kept, through chains");
    for m in [&tagged, &kept_child, &of_tagged, &tagged_index] {
        assert!(store.get_manifest(&repo, &m.digest).await.unwrap().is_some(), "{} stays", m.digest);
    }
    assert_eq!(store.referrers(&repo, &tagged.digest).await.unwrap().len(), 1);
}
