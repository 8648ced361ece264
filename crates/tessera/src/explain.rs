//! `tessera explain`: how a name is routed and where its bytes come from, told by the same
//! sources a running server asks, built from the configuration without a server. The hosted
//! stores are opened read-only (a server may be using them); upstream caches live in a
//! scratch directory for the length of the command.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::Context;
use tessera_client::ImageReference;
use tessera_config::Config;
use tessera_federation::{Ask, Federation, Found, Matched, Resolved};
use tessera_spec::{Accept, ParsedManifest, RepoName};
use tessera_store::SqliteMetaStore;

/// The routing table of `config` as `explain` inspects it, and the scratch directory its
/// upstream caches live in while it does.
struct Inspected {
    federation: Federation,
    _scratch: tempfile::TempDir,
}

async fn inspect(config: &Config) -> anyhow::Result<Inspected> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let database = config.data.join("meta.sqlite");
    let registry = if config.storage.postgres.is_some() {
        crate::open_registry(config, &crate::BlobHome::open(config).await?).await?
    } else if database.is_file() {
        let meta = SqliteMetaStore::open_read_only(&database)
            .with_context(|| format!("cannot read the metadata in {}", config.data.display()))?;
        crate::registry_over(config, meta, &crate::BlobHome::open(config).await?)?
    } else {
        // No data yet: hosted repositories are empty.
        let mut empty = config.clone();
        empty.data = scratch.path().join("hosted");
        empty.storage.s3 = None;
        crate::open_registry(&empty, &crate::BlobHome::Data(empty.data.clone())).await?
    };
    let caches = scratch.path().join("cache");
    let scratch_blobs = crate::BlobHome::Data(caches.clone());
    let federation = crate::open_federation_in(config, None, Arc::new(registry), &caches, &scratch_blobs).await?;
    Ok(Inspected { federation, _scratch: scratch })
}

fn resolve(federation: &Federation, host: Option<&str>, ns: Option<&str>, name: &RepoName) -> anyhow::Result<Resolved> {
    federation.table.resolve(host, ns, name).map_err(|e| anyhow::anyhow!("{}", e.message))
}

/// Explains, without a running server, how `reference` (`NAME`, `NAME:TAG`, `NAME@DIGEST`)
/// is routed under `config`: the matching route, and for each source where the manifest
/// and blobs would come from.
pub async fn explain(config: &Config, host: Option<&str>, ns: Option<&str>, reference: &str) -> anyhow::Result<String> {
    let image = ImageReference::parse(reference)?;
    let (name, tag_or_digest) = (&image.name, &image.reference);
    let inspected = inspect(config).await?;
    let resolved = resolve(&inspected.federation, host, ns, name)?;
    let shown = image.to_string();
    let mut out = String::new();
    match resolved.matched {
        Matched::Route(i) => writeln!(out, "{shown}: route {i} of the configuration")?,
        Matched::Static => writeln!(out, "{shown}: no route matched; a static source has this repository")?,
        Matched::Authority => {
            writeln!(out, "{shown}: no route matched; the upstream declaring authority {:?} answers", ns.unwrap_or(""))?
        }
        Matched::Fallback => writeln!(out, "{shown}: no route matched; hosted")?,
    }
    let pushes = if resolved.write_to.is_some() { "accepted (hosted)" } else { "refused (read-only)" };
    writeln!(out, "  pushes: {pushes}")?;
    let numbered = resolved.sources.len() > 1;
    for (i, (source, n)) in resolved.sources.iter().enumerate() {
        let step = if numbered { format!("  {}. ", i + 1) } else { "  ".to_string() };
        writeln!(out, "{step}{}", source.describe(n, tag_or_digest))?;
    }
    writeln!(out, "  {}", inspected.federation.signing.describe(name, &resolved))?;
    Ok(out)
}

/// Asks each source in turn for the manifest, as a pull would, and for the first that has
/// it lists what that manifest needs (child manifests of an index; config and layers of an
/// image) with where a client is sent for each.
pub async fn explain_live(
    config: &Config,
    host: Option<&str>,
    ns: Option<&str>,
    reference: &str,
) -> anyhow::Result<String> {
    let ImageReference { name, reference: tag_or_digest } = ImageReference::parse(reference)?;
    let inspected = inspect(config).await?;
    let resolved = resolve(&inspected.federation, host, ns, &name)?;
    let mut out = String::from("  live:\n");
    for (position, (source, n)) in resolved.sources.iter().enumerate() {
        let label = source.label();
        let m = match source.manifest(n, &tag_or_digest, &Accept::any(), &Ask::default()).await {
            Ok(Found::Here(served)) => served.manifest,
            Ok(Found::Redirect(url)) => {
                writeln!(out, "    {label} ({n}): manifest 307 to {url}")?;
                break;
            }
            Ok(Found::Absent(e)) => {
                writeln!(out, "    {label} ({n}) answers 404: {}", e.message)?;
                continue;
            }
            Err(e) => {
                writeln!(out, "    {label} ({n}): {}", e.message)?;
                continue;
            }
        };
        let parsed =
            ParsedManifest::parse(Some(&m.media_type), &m.bytes).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        writeln!(out, "    {label} answers {} ({}, {} bytes) for {n}", m.digest, m.media_type, m.bytes.len())?;
        let needs = parsed.manifests.iter().map(|d| ("manifest", d));
        let needs = needs.chain(parsed.config.iter().map(|d| ("config", d)));
        for (kind, d) in needs.chain(parsed.layers.iter().map(|d| ("layer", d))) {
            writeln!(out, "      {kind} {} {} bytes ({})", d.digest, d.size, source.locate(n, d).await)?;
        }
        let signing = &inspected.federation.signing;
        let signatures = signing.explain(&resolved, position, &name, &tag_or_digest, &m).await;
        writeln!(out, "    signatures:")?;
        for line in signatures.map_err(|e| anyhow::anyhow!("{}", e.message))? {
            writeln!(out, "      {line}")?;
        }
        // The first source that answers is the one a pull would use.
        break;
    }
    Ok(out)
}
