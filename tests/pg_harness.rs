//! Checks the `TempPg` test harness itself: two throwaway clusters start
//! concurrently, are independent, answer over TCP and the Unix socket, and
//! leave nothing behind once dropped.

mod support;

use std::net::TcpStream;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use support::pg::{pg_bin, TempPg};

#[tokio::test]
async fn two_clusters_run_concurrently_and_clean_up() -> Result<()> {
    let (a, b) = tokio::try_join!(TempPg::start_async(), TempPg::start_async())?;
    ensure!(a.port() != b.port(), "both clusters got port {}", a.port());
    ensure!(
        a.root_dir() != b.root_dir(),
        "both clusters share a directory"
    );

    for (i, pg) in [&a, &b].into_iter().enumerate() {
        let client = pg.connect_direct().await?;
        let one: i32 = client.query_one("select 1", &[]).await?.try_get(0)?;
        ensure!(one == 1, "select 1 returned {one}");

        client
            .batch_execute("create table harness (id int primary key, label text not null)")
            .await?;
        let label = format!("cluster-{i}");
        let inserted = client
            .execute(
                "insert into harness (id, label) values ($1, $2)",
                &[&1i32, &label],
            )
            .await?;
        ensure!(inserted == 1, "insert affected {inserted} rows");
        let rows = client
            .query("select id, label from harness order by id", &[])
            .await?;
        ensure!(rows.len() == 1, "expected one row, got {}", rows.len());
        let id: i32 = rows[0].try_get(0)?;
        let got: String = rows[0].try_get(1)?;
        ensure!(
            id == 1 && got == label,
            "cluster {i}: read back ({id}, {got:?}), wanted (1, {label:?})"
        );

        // The Unix socket answers too, and sees the same data.
        ensure!(
            pg.socket_path().exists(),
            "socket {} missing",
            pg.socket_path().display()
        );
        let via_socket = pg
            .connect_socket()
            .await
            .context("connecting over the Unix socket")?;
        let got: String = via_socket
            .query_one("select label from harness where id = 1", &[])
            .await?
            .try_get(0)?;
        ensure!(got == label, "socket connection read {got:?}");
    }

    let gone = [
        (a.addr(), a.root_dir().to_path_buf(), a.data_dir()),
        (b.addr(), b.root_dir().to_path_buf(), b.data_dir()),
    ];
    drop(a);
    drop(b);

    for (addr, root, data) in gone {
        ensure!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
            "{addr} still accepts connections after drop"
        );
        ensure!(!data.exists(), "{} still exists after drop", data.display());
        ensure!(!root.exists(), "{} still exists after drop", root.display());
    }
    Ok(())
}

#[test]
fn client_tools_are_found() {
    for tool in ["pg_ctl", "psql", "pgbench"] {
        assert!(
            pg_bin(tool).is_some(),
            "{tool} not found: run scripts/setup.sh"
        );
    }
    assert!(pg_bin("definitely-not-a-postgres-tool").is_none());
}

#[test]
fn connection_string_quotes_awkward_hosts() {
    assert_eq!(
        TempPg::connection_string("127.0.0.1", 5432),
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    );
    assert_eq!(
        TempPg::connection_string("/tmp/a dir", 1),
        "host='/tmp/a dir' port=1 user=postgres dbname=postgres"
    );
}

#[test]
fn a_panicking_test_leaves_no_server_behind() -> Result<()> {
    let seen = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pg = match TempPg::start() {
            Ok(pg) => pg,
            Err(e) => panic!("TempPg::start failed: {e:#}"),
        };
        if let Ok(mut seen) = seen.lock() {
            *seen = Some((pg.addr(), pg.root_dir().to_path_buf()));
        }
        panic!("deliberate panic while holding a TempPg");
    }));
    ensure!(outcome.is_err(), "the closure was supposed to panic");
    let (addr, root) = seen
        .into_inner()
        .ok()
        .flatten()
        .context("TempPg::start did not get far enough to record its address")?;
    ensure!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "{addr} still accepts connections after a panic"
    );
    ensure!(
        !root.exists(),
        "{} left behind after a panic",
        root.display()
    );
    Ok(())
}

#[tokio::test]
async fn stop_and_restart_keep_port_and_data() -> Result<()> {
    let mut pg = TempPg::start_async().await?;
    let port = pg.port();
    let client = pg.connect_direct().await?;
    client
        .batch_execute("create table kept (v int); insert into kept values (42)")
        .await?;

    pg.stop()?;
    ensure!(
        TcpStream::connect_timeout(&pg.addr(), Duration::from_secs(2)).is_err(),
        "server still accepts connections after stop()"
    );
    ensure!(
        client.simple_query("select 1").await.is_err(),
        "old connection survived stop()"
    );

    pg.restart()?;
    ensure!(pg.port() == port, "restart moved the port");
    let client = pg.connect_direct().await?;
    let v: i32 = client
        .query_one("select v from kept", &[])
        .await?
        .try_get(0)?;
    ensure!(v == 42, "read back {v} after restart");
    Ok(())
}
