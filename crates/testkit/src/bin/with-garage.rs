//! `with-garage COMMAND [ARGS…]`: runs COMMAND with a Garage (S3) started for it on
//! loopback and `TESSERA_TEST_S3` set to the `[storage.s3]` table of its bucket, so that
//! in-process test servers keep their blobs there (each under a prefix of its own); stops
//! Garage afterwards and exits with COMMAND's status. CI runs the OCI API suites this way.

use std::process::{Command, ExitCode};

use tessera_testkit::garage::Garage;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: with-garage COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let Some(binary) = Garage::binary() else {
        eprintln!("with-garage: no Garage binary (set TESSERA_GARAGE, or let .ci/run install it)");
        return ExitCode::from(2);
    };
    let result = (|| -> anyhow::Result<std::process::ExitStatus> {
        let garage = Garage::start(&binary)?;
        let keys = tessera_testkit::tempdir()?;
        let storage = garage.storage_toml(keys.path(), "")?;
        eprintln!("with-garage: Garage at {}, bucket {}", garage.endpoint, garage.bucket);
        Ok(Command::new(&program).args(args).env("TESSERA_TEST_S3", storage).status()?)
    })();
    match result {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("with-garage: {e:#}");
            ExitCode::from(2)
        }
    }
}
