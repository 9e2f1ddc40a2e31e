//! The writer thread over a failing stand-in disk and over real files:
//! group commit, the lock, failures, fail-closed, the queue bound,
//! rotation, closing, and the checkpoint rewrite attack.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_identity::{Identifier, Identity};

use super::*;
use crate::audit::checkpoint;
use crate::audit::machine::memory::MemStorage;
use crate::audit::tests::{rechain, rechain_with};
use crate::audit::{fields_of, format_line};
use crate::audit::{verify, verify_bytes, verify_rotated, verify_with, Label};
use crate::audit::{Tamper, VerifyError, VerifyOptions};

fn event(n: u64) -> AuditEvent {
    AuditEvent::TunnelClosed {
        tunnel: Label::new(&format!("t{n}")).unwrap(),
        principal: Identifier::from_public_key(&[1; 32]),
        service: "db".parse().unwrap(),
        bytes_up: n,
        bytes_down: 2 * n,
        reason: "client closed".into(),
    }
}

/// A runtime to call `record` from, as nodes do (it then only hands over).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn fast() -> AuditOptions {
    AuditOptions {
        retry_interval: Duration::from_millis(20),
        ..AuditOptions::default()
    }
}

fn mem_log(options: AuditOptions) -> (AuditLog, MemStorage) {
    let (storage, opened) = MemStorage::new();
    let log = AuditLog::start(
        storage.clone(),
        opened,
        Path::new("/var/log/postern/audit.jsonl"),
        options,
    )
    .unwrap();
    (log, storage)
}

/// Waits until `f` holds (the writer runs on its own thread).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_second_writer_of_the_same_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let first = AuditLog::open(&path).unwrap();
    first.record(&event(1)).unwrap();
    let err = AuditLog::open(&path).unwrap_err();
    assert!(matches!(err, AuditError::Locked { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("another process")
            && text.contains("its own audit log file")
            && text.contains("audit.jsonl"),
        "{text}"
    );
    // The first writer is undisturbed.
    first.record(&event(2)).unwrap();
    assert_eq!(verify(&path).unwrap().records, 2);
    // Once it closes, the file can be opened again and the chain goes on.
    drop(first);
    let second = AuditLog::open(&path).unwrap();
    second.record(&event(3)).unwrap();
    assert_eq!(verify(&path).unwrap().records, 3);
}

#[test]
fn records_from_async_code_are_committed_in_batches() {
    let (log, disk) = mem_log(AuditOptions::default());
    // The first batch's sync is held, so that everything recorded meanwhile
    // queues up behind it.
    disk.disk().hold_sync = true;
    let rt = runtime();
    rt.block_on(async { log.record(&event(0)).unwrap() });
    eventually("the first append", || disk.disk().appends == 1);
    let log = Arc::new(log);
    let tasks: Vec<_> = (0..4u64)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                runtime().block_on(async {
                    for i in 1..=50 {
                        log.record(&event(t * 100 + i)).unwrap();
                    }
                })
            })
        })
        .collect();
    for t in tasks {
        t.join().unwrap();
    }
    // Nothing waited for the disk: 200 records are handed over, and none of
    // them is written yet.
    assert_eq!(disk.disk().syncs, 0);
    disk.release();
    log.flush().unwrap();
    let d = disk.disk();
    assert_eq!(
        (d.appends, d.syncs),
        (2, 2),
        "one write and one sync per batch"
    );
    drop(d);
    let report = verify_bytes(disk.text(0).as_bytes(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.records, 201);
    assert_eq!(log.head(), report.head);
}

#[test]
fn a_failing_disk_is_reported_refused_when_fail_closed_and_recovers_without_loss() {
    let (log, disk) = mem_log(fast().with_fail_closed(true));
    let (open_log, open_disk) = mem_log(fast());
    for (log, _) in [(&log, &disk), (&open_log, &open_disk)] {
        log.record(&event(1)).unwrap();
        assert_eq!(log.health(), AuditHealth::Writable);
        assert!(log.admit().is_ok());
    }
    // The disk fills up part-way through the next write.
    disk.disk().fail_append = Some(25);
    open_disk.disk().fail_append = Some(25);
    let rt = runtime();
    for log in [&log, &open_log] {
        rt.block_on(async {
            for i in 2..=31 {
                // Handed over without waiting, even though nothing is written.
                log.record(&event(i)).unwrap();
            }
        });
        eventually("a failed write", || {
            matches!(log.health(), AuditHealth::Failing { .. })
        });
    }
    let AuditHealth::Failing {
        error,
        queued,
        lost,
        ..
    } = log.health()
    else {
        panic!("not failing")
    };
    assert!(error.contains("no space left"), "{error}");
    assert_eq!((queued, lost), (30, 0));
    // Fail-closed: nothing new is admitted, with the file and the error.
    let refused = log.admit().unwrap_err();
    assert_eq!(refused.path(), Path::new("/var/log/postern/audit.jsonl"));
    let text = refused.to_string();
    assert!(
        text.contains("/var/log/postern/audit.jsonl")
            && text.contains("no space left")
            && text.contains("fail-closed"),
        "{text}"
    );
    // Fail-open: admitted (and warned about).
    assert!(open_log.admit().is_ok());
    // A caller outside async code learns that its record is not on disk.
    assert!(matches!(
        log.record(&event(32)),
        Err(AuditError::Unavailable { .. })
    ));
    assert!(matches!(log.flush(), Err(AuditError::Unavailable { .. })));
    // The disk recovers: everything queued is written, the chain continues,
    // and tunnels are admitted again.
    disk.disk().fail_append = None;
    eventually("recovery", || log.health() == AuditHealth::Writable);
    log.flush().unwrap();
    assert!(log.admit().is_ok());
    let text = disk.text(0);
    let report = verify_bytes(text.as_bytes(), &VerifyOptions::default()).unwrap();
    assert_eq!(report.records, 32);
    let ups: Vec<u64> = lines(&text)
        .iter()
        .map(|v| v["bytes_up"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ups,
        (1..=32).collect::<Vec<_>>(),
        "nothing lost or repeated"
    );
    assert!(disk.disk().truncations >= 1, "the torn write was cut off");
}

#[test]
fn records_beyond_the_queue_bound_are_counted_and_noted_once_writing_works() {
    let options = AuditOptions {
        max_queued: 5,
        ..fast()
    };
    let (log, disk) = mem_log(options);
    disk.disk().fail_append = Some(0);
    let rt = runtime();
    rt.block_on(async {
        for i in 1..=5 {
            log.record(&event(i)).unwrap();
        }
        for i in 6..=8 {
            assert!(matches!(
                log.record(&event(i)),
                Err(AuditError::QueueFull { queued: 5, .. })
            ));
        }
    });
    eventually("a failed write", || {
        matches!(log.health(), AuditHealth::Failing { lost: 3, .. })
    });
    disk.disk().fail_append = None;
    eventually("recovery", || log.health() == AuditHealth::Writable);
    log.flush().unwrap();
    // Room again: a new record is taken.
    log.record(&event(9)).unwrap();
    let text = disk.text(0);
    let lines = lines(&text);
    let kinds: Vec<&str> = lines.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "tunnel_closed",
            "tunnel_closed",
            "tunnel_closed",
            "tunnel_closed",
            "tunnel_closed",
            "records_lost",
            "tunnel_closed"
        ]
    );
    assert_eq!(lines[5]["count"], 3);
    verify_bytes(text.as_bytes(), &VerifyOptions::default()).unwrap();
}

#[test]
fn rotation_starts_a_linked_file_and_both_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let id = Identity::from_secret_bytes(&[3; 32]);
    let signer = VerifyOptions::default().with_signer(id.identifier());
    let log = AuditLog::open_with(&path, AuditOptions::default().with_signer(id.clone())).unwrap();
    for i in 1..=3 {
        log.record(&event(i)).unwrap();
    }
    // logrotate: move, then signal.
    fs::rename(&path, &rotated).unwrap();
    log.record(&event(4)).unwrap();
    log.reopen().unwrap();
    log.record(&event(5)).unwrap();
    log.close().unwrap();
    let old = verify_with(&rotated, &signer).unwrap();
    assert_eq!(
        (old.records, old.uncovered()),
        (5, 0),
        "4 records and a checkpoint"
    );
    let new = verify_with(&path, &signer).unwrap();
    assert_eq!(new.continues.as_ref(), Some(&old.head));
    let first = &lines(&fs::read_to_string(&path).unwrap())[0];
    assert_eq!(first["event"], "continued");
    let reports = verify_rotated(&[rotated.clone(), path.clone()], &signer).unwrap();
    assert_eq!(reports.len(), 2);
    // Out of order, or with a file missing in between, the link fails.
    assert!(matches!(
        verify_rotated(&[path.clone(), rotated.clone()], &VerifyOptions::default()),
        Err(VerifyError::Unlinked { .. })
    ));
    // Reopening when nothing was moved keeps the same file and chain.
    let log = AuditLog::open(&path).unwrap();
    log.reopen().unwrap();
    log.record(&event(6)).unwrap();
    drop(log);
    assert!(verify(&path).unwrap().continues.is_some());
    assert!(!dir.path().join("audit.jsonl.2").exists());
}

#[test]
fn a_path_that_cannot_be_opened_fails_closed_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let path = logs.join("audit.jsonl");
    let log = AuditLog::open_with(&path, fast().with_fail_closed(true)).unwrap();
    log.record(&event(1)).unwrap();
    let head = log.head();
    // The directory disappears (a careless cleanup); rotation cannot open
    // a new file there.
    fs::rename(&logs, dir.path().join("gone")).unwrap();
    let err = log.reopen().unwrap_err();
    assert!(matches!(err, AuditError::Io { .. }), "{err:?}");
    assert!(matches!(log.health(), AuditHealth::Failing { .. }));
    let refused = log.admit().unwrap_err().to_string();
    assert!(refused.contains("logs/audit.jsonl"), "{refused}");
    runtime().block_on(async { log.record(&event(2)).unwrap() });
    // The directory is back: the next retry opens a new file, linked to the
    // old one, with the queued record.
    fs::create_dir(&logs).unwrap();
    eventually("recovery", || log.health() == AuditHealth::Writable);
    log.flush().unwrap();
    assert!(log.admit().is_ok());
    let report = verify(&path).unwrap();
    assert_eq!(report.continues, Some(head));
    assert_eq!(report.records, 2);
}

#[test]
fn dropping_the_last_handle_writes_the_queue_and_a_final_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let id = Identity::from_secret_bytes(&[3; 32]);
    let log = AuditLog::open_with(&path, AuditOptions::default().with_signer(id.clone())).unwrap();
    runtime().block_on(async {
        for i in 1..=10 {
            log.record(&event(i)).unwrap();
        }
    });
    drop(log);
    let report = verify_with(
        &path,
        &VerifyOptions::default().with_signer(id.identifier()),
    )
    .unwrap();
    assert_eq!((report.records, report.uncovered()), (11, 0));
    // A closed log refuses records.
    let log = AuditLog::open(&path).unwrap();
    log.close().unwrap();
    assert!(matches!(
        log.record(&event(1)),
        Err(AuditError::Closed { .. })
    ));
    assert_eq!(log.health(), AuditHealth::Closed);
}

/// The attack the checkpoints exist for: someone with write access rewrites
/// the log from line 3 on and recomputes every hash, so that the chain
/// verifies. A checkpoint signed by the node covers line 3; with the node's
/// identity required (`--signer`), every variant of the rewrite fails, and
/// the untouched log passes.
#[test]
fn a_rewritten_chain_fails_with_a_required_signer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let node = Identity::from_secret_bytes(&[3; 32]);
    let options = AuditOptions {
        checkpoint_records: 5,
        ..AuditOptions::default().with_signer(node.clone())
    };
    let log = AuditLog::open_with(&path, options).unwrap();
    for i in 1..=12 {
        log.record(&event(i)).unwrap();
    }
    drop(log);
    let required = VerifyOptions::default().with_signer(node.identifier());
    let original = fs::read_to_string(&path).unwrap();
    let text: Vec<String> = original.lines().map(str::to_owned).collect();
    // 12 records, a checkpoint after every 5 lines, one at close.
    let kinds: Vec<String> = lines(&original)
        .iter()
        .map(|v| v["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.len(), 15);
    assert_eq!(
        (&*kinds[5], &*kinds[11], &*kinds[14]),
        ("checkpoint", "checkpoint", "checkpoint")
    );
    // The legitimate log passes.
    let report = verify_with(&path, &required).unwrap();
    assert_eq!(report.uncovered(), 0);
    assert_eq!(report.signers, [node.identifier()]);

    let attack = |bytes: Vec<u8>| {
        fs::write(&path, bytes).unwrap();
        (verify(&path), verify_with(&path, &required))
    };
    let rewrite = |n: usize| {
        let mut lines = text.clone();
        let before = lines[n - 1].clone();
        lines[n - 1] = before.replace("\"client closed\"", "\"nothing happened\"");
        assert_ne!(lines[n - 1], before);
        lines
    };
    let rewritten = rewrite(3);

    // 1. Rewritten, hashes recomputed, checkpoints kept: their signatures
    //    no longer match, with or without --signer.
    let (plain, signed) = attack(rechain(&rewritten));
    for result in [plain, signed] {
        assert!(
            matches!(
                result,
                Err(VerifyError::Tampered {
                    line: 6,
                    kind: Tamper::BadSignature,
                    ..
                })
            ),
            "{result:?}"
        );
    }

    // 2. The checkpoints re-signed with the attacker's own key: the chain
    //    verifies (naming the attacker as signer); --signer fails.
    let attacker = Identity::from_secret_bytes(&[66; 32]);
    let resigned = rechain_with(&rewritten, |n, line, prev| {
        let time = serde_json::from_str::<serde_json::Value>(line).unwrap()["time"]
            .as_str()
            .unwrap()
            .to_owned();
        let note = checkpoint::sign(&attacker, n - 1, prev, &time, 5);
        Some(format_line(n, &time, prev, &fields_of(&note).unwrap()))
    });
    let (plain, signed) = attack(resigned);
    assert_eq!(plain.unwrap().signers, [attacker.identifier()]);
    assert!(
        matches!(
            signed,
            Err(VerifyError::Tampered {
                line: 6,
                kind: Tamper::WrongSigner,
                ..
            })
        ),
        "{signed:?}"
    );

    // 3. The checkpoints after the rewritten line dropped (here: all of
    //    them): the chain verifies; --signer finds nothing signed.
    let dropped: Vec<String> = rewritten
        .iter()
        .filter(|l| !l.contains("\"event\":\"checkpoint\""))
        .cloned()
        .collect();
    let (plain, signed) = attack(rechain(&dropped));
    assert_eq!(plain.unwrap().checkpoints, 0);
    assert!(
        matches!(
            signed,
            Err(VerifyError::Tampered {
                line: 1,
                kind: Tamper::Unsigned,
                ..
            })
        ),
        "{signed:?}"
    );
    // The same with line 8 rewritten, keeping the checkpoint at line 6
    // before it: 7 lines follow that checkpoint, which allows 5.
    let kept: Vec<String> = rewrite(8)
        .into_iter()
        .enumerate()
        .filter(|(i, l)| *i < 7 || !l.contains("\"event\":\"checkpoint\""))
        .map(|(_, l)| l)
        .collect();
    let (plain, signed) = attack(rechain(&kept));
    let plain = plain.unwrap();
    assert_eq!((plain.checkpoints, plain.uncovered()), (1, 7));
    assert!(
        matches!(
            signed,
            Err(VerifyError::Tampered {
                line: 12,
                kind: Tamper::Unsigned,
                ..
            })
        ),
        "{signed:?}"
    );

    // 4. The untouched log, written back, passes again.
    let (plain, signed) = attack(original.into_bytes());
    assert!(plain.is_ok() && signed.is_ok());
}

#[test]
fn closing_on_a_failing_disk_says_what_was_not_written() {
    let (log, disk) = mem_log(fast());
    disk.disk().fail_append = Some(0);
    runtime().block_on(async { log.record(&event(1)).unwrap() });
    let err = log.close().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, AuditError::ClosedIncomplete { .. })
            && text.contains("1 record could not be written")
            && text.contains("no space left"),
        "{text}"
    );
}
