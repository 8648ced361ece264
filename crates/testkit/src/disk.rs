//! Files on disk for tests: every file under a directory, and a small tmpfs to fill.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::TempDir;

/// Every file under `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A small tmpfs, unmounted when dropped.
pub struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    /// A tmpfs of `size` (e.g. `"40m"`), or `None` with the test skipped where this process
    /// may not mount (not root); a failure where CI requires every test to run.
    pub fn for_test(size: &str) -> Option<SmallDisk> {
        let disk = Self::mount(size);
        if disk.is_none() {
            if std::env::var_os("TESSERA_REQUIRE_CLIENTS").is_some() {
                panic!("cannot mount a tmpfs; CI runs as root and must");
            }
            eprintln!("SKIPPED: cannot mount a tmpfs (not root)");
        }
        disk
    }

    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = crate::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with a file outside any data directory (removing it frees the
    /// space again); returns its size.
    pub fn fill(&self) -> u64 {
        let mut file = std::fs::File::create(self.filler()).expect("create the filler");
        let block = vec![0x5au8; 64 * 1024];
        let mut written = 0;
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        written
    }

    /// Removes the file [`SmallDisk::fill`] wrote.
    pub fn free(&self) {
        std::fs::remove_file(self.filler()).expect("remove the filler");
    }

    pub fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
