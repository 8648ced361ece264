//! The progress of blob transfers on stderr.

use indicatif::{ProgressBar, ProgressStyle};
use tessera_spec::Digest;

/// The progress of one blob's transfer on stderr: on a terminal that can draw it, a bar with
/// bytes, rate and time left (indicatif), the digest shortened as docker does; elsewhere
/// (a log, CI, `TERM=dumb`) one line with the whole digest as the blob starts, no escapes.
pub fn blob(what: &str, digest: &Digest, size: u64) -> ProgressBar {
    let bar = ProgressBar::new(size);
    if bar.is_hidden() {
        eprintln!("{what} {digest} {}", megabytes(size));
        return bar;
    }
    let style = ProgressStyle::with_template(
        "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.with_style(style).with_message(format!("{what} {}", &digest.hex()[..12]))
}

/// Leaves a finished bar on its own line.
pub fn finish(bar: &ProgressBar) {
    if !bar.is_hidden() {
        bar.finish();
        eprintln!();
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
