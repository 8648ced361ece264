//! `with-engines COMMAND [ARGS…]`: runs COMMAND with the scale-out engines started for it on
//! loopback — Garage (S3) and PostgreSQL — and `TESSERA_TEST_S3` set to the
//! `[storage.s3]` table of Garage's bucket and `TESSERA_TEST_POSTGRES` to the URL of a
//! database, so that every test server keeps its blobs in the bucket and its metadata in
//! the database (each under a prefix and a schema of its own); stops both afterwards and
//! exits with COMMAND's status. CI runs the OCI API and real-client suites this way.

use std::process::{Command, ExitCode};

use tessera_testkit::garage::Garage;
use tessera_testkit::postgres::Postgres;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: with-engines COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let result = (|| -> anyhow::Result<std::process::ExitStatus> {
        let garage_binary = Garage::binary()
            .ok_or_else(|| anyhow::anyhow!("no Garage binary (set TESSERA_GARAGE, or let .ci/run install it)"))?;
        let postgres_binaries = Postgres::binaries()
            .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server binaries (apt-get install postgresql)"))?;
        let garage = Garage::start(&garage_binary)?;
        let postgres = Postgres::start(&postgres_binaries)?;
        let database = postgres.database("tessera")?;
        let keys = tessera_testkit::tempdir()?;
        let storage = garage.storage_toml(keys.path(), "")?;
        eprintln!("with-engines: Garage at {}, PostgreSQL at {database}", garage.endpoint);
        Ok(Command::new(&program)
            .args(args)
            .env("TESSERA_TEST_S3", storage)
            .env("TESSERA_TEST_POSTGRES", database)
            .status()?)
    })();
    match result {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("with-engines: {e:#}");
            ExitCode::from(2)
        }
    }
}
