//! Policies that change while a node runs: a policy directory re-read on
//! demand, swapped in atomically only when the new files are valid.
//!
//! The enforcement points (outlet, relay) call
//! [`LivePolicies::reload_if_changed`] from a timer and re-decide their live
//! tunnels when [`LivePolicies::generation`] moves. No file watching here:
//! reading a few small files once a second is cheaper than any watcher's
//! bookkeeping, works on every file system (including configuration
//! management's symlink swaps), and bounds how stale a decision can be.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use crate::audit::AuditEvent;
use crate::engine::{read_policy_dir, PolicyEngine, PolicyError, PolicySource};

/// A policy set that may be replaced while it is in use. `Send + Sync`.
pub struct LivePolicies {
    /// Where the policies come from; `None` for a fixed set.
    dir: Option<PathBuf>,
    current: RwLock<Arc<PolicyEngine>>,
    /// The sources `current` was built from, and the last sources refused
    /// (so a broken file is reported once, not on every poll).
    seen: Mutex<Seen>,
    generation: AtomicU64,
}

#[derive(Default)]
struct Seen {
    loaded: Vec<PolicySource>,
    refused: Option<Vec<PolicySource>>,
}

/// What a reload did.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReloadOutcome {
    /// The files did not change (or the set is fixed).
    Unchanged,
    /// New policies are in force.
    Reloaded {
        /// How many.
        policies: usize,
        /// Their digest ([`PolicyEngine::digest`]).
        digest: String,
    },
    /// The files changed but are invalid or unreadable: the previous
    /// policies stay in force.
    Refused(PolicyError),
    /// Still the same broken or unreadable files as at the last poll
    /// (reported then); the previous policies stay in force.
    StillRefused,
}

impl ReloadOutcome {
    /// The audit record of this outcome (`None` when nothing changed or a
    /// refusal was already recorded), given the policies now in force.
    pub fn audit_event(&self, in_force: &PolicyEngine) -> Option<AuditEvent> {
        match self {
            ReloadOutcome::Unchanged | ReloadOutcome::StillRefused => None,
            ReloadOutcome::Reloaded { policies, digest } => Some(AuditEvent::PolicyReload {
                ok: true,
                digest: digest.clone(),
                policies: *policies,
                diagnostics: None,
            }),
            ReloadOutcome::Refused(error) => Some(AuditEvent::PolicyReload {
                ok: false,
                digest: in_force.digest().to_owned(),
                policies: in_force.len(),
                diagnostics: Some(error.to_string()),
            }),
        }
    }
}

impl LivePolicies {
    /// Loads the policies of `dir`; fails (with Cedar's diagnostics) if they
    /// are invalid, so that a node never starts on broken policies.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let sources = read_policy_dir(dir)?;
        let engine = PolicyEngine::from_sources(sources.clone())?;
        Ok(LivePolicies {
            dir: Some(dir.to_path_buf()),
            current: RwLock::new(Arc::new(engine)),
            seen: Mutex::new(Seen {
                loaded: sources,
                refused: None,
            }),
            generation: AtomicU64::new(0),
        })
    }

    /// A fixed policy set (no directory; reloads change nothing).
    pub fn fixed(engine: PolicyEngine) -> Self {
        LivePolicies {
            dir: None,
            current: RwLock::new(Arc::new(engine)),
            seen: Mutex::new(Seen::default()),
            generation: AtomicU64::new(0),
        }
    }

    /// The directory policies are read from, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The policies in force.
    pub fn current(&self) -> Arc<PolicyEngine> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Increases by one each time new policies come into force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads the directory; if the files changed and are valid, they come
    /// into force at once. Blocking file I/O: call it off the async threads.
    pub fn reload_if_changed(&self) -> ReloadOutcome {
        let Some(dir) = &self.dir else {
            return ReloadOutcome::Unchanged;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let sources = match read_policy_dir(dir) {
            Ok(sources) => sources,
            Err(error) => {
                // Unreadable: report once per distinct error text.
                let marker = vec![PolicySource::new("<unreadable>", error.to_string())];
                if seen.refused.as_ref() == Some(&marker) {
                    return ReloadOutcome::StillRefused;
                }
                seen.refused = Some(marker);
                return ReloadOutcome::Refused(error);
            }
        };
        if sources == seen.loaded {
            seen.refused = None;
            return ReloadOutcome::Unchanged;
        }
        if seen.refused.as_ref() == Some(&sources) {
            // The same broken files as last time: keep quiet, keep the old.
            return ReloadOutcome::StillRefused;
        }
        match PolicyEngine::from_sources(sources.clone()) {
            Ok(engine) => {
                let outcome = ReloadOutcome::Reloaded {
                    policies: engine.len(),
                    digest: engine.digest().to_owned(),
                };
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(engine);
                self.generation.fetch_add(1, Ordering::AcqRel);
                seen.loaded = sources;
                seen.refused = None;
                outcome
            }
            Err(error) => {
                seen.refused = Some(sources);
                ReloadOutcome::Refused(error)
            }
        }
    }

    /// Re-reads the directory every `every` on a background thread for as
    /// long as this set is in use (the thread holds only a weak reference
    /// and ends with the last `Arc`), calling `report` with each change or
    /// refusal and the policies in force afterwards. Does nothing for a
    /// fixed set.
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
        mut report: impl FnMut(&ReloadOutcome, &PolicyEngine) + Send + 'static,
    ) -> std::io::Result<()> {
        if self.dir.is_none() {
            return Ok(());
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("policy-reload".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(live) = weak.upgrade() else { return };
                let outcome = live.reload_if_changed();
                if !matches!(
                    outcome,
                    ReloadOutcome::Unchanged | ReloadOutcome::StillRefused
                ) {
                    report(&outcome, &live.current());
                }
            })?;
        Ok(())
    }
}

impl std::fmt::Debug for LivePolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("LivePolicies")
            .field("dir", &self.dir)
            .field("policies", &current.len())
            .field("digest", &current.digest())
            .field("generation", &self.generation())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERMIT: &str =
        r#"permit(principal, action == Action::"connect", resource == Service::"db");"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reloads_valid_changes_and_keeps_the_old_on_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.cedar", PERMIT);
        let live = LivePolicies::load(dir.path()).unwrap();
        assert_eq!((live.current().len(), live.generation()), (1, 0));
        assert!(matches!(live.reload_if_changed(), ReloadOutcome::Unchanged));

        // A second valid file comes into force.
        write(dir.path(), "b.cedar", PERMIT);
        let outcome = live.reload_if_changed();
        assert!(
            matches!(outcome, ReloadOutcome::Reloaded { policies: 2, .. }),
            "{outcome:?}"
        );
        assert_eq!((live.current().len(), live.generation()), (2, 1));
        let event = outcome.audit_event(&live.current()).unwrap();
        assert!(matches!(event, AuditEvent::PolicyReload { ok: true, .. }));

        // A broken file: refused once with diagnostics, then quietly; the two
        // valid policies stay.
        write(
            dir.path(),
            "b.cedar",
            "permit(principal, action, resource) when {",
        );
        let outcome = live.reload_if_changed();
        match &outcome {
            ReloadOutcome::Refused(error) => {
                assert!(error.to_string().contains("b.cedar"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        let event = outcome.audit_event(&live.current()).unwrap();
        assert!(matches!(
            event,
            AuditEvent::PolicyReload {
                ok: false,
                policies: 2,
                ..
            }
        ));
        assert!(matches!(
            live.reload_if_changed(),
            ReloadOutcome::StillRefused
        ));
        assert_eq!((live.current().len(), live.generation()), (2, 1));

        // Fixed again, and then emptied: an empty directory denies all.
        std::fs::remove_file(dir.path().join("b.cedar")).unwrap();
        assert!(matches!(
            live.reload_if_changed(),
            ReloadOutcome::Reloaded { policies: 1, .. }
        ));
        std::fs::remove_file(dir.path().join("a.cedar")).unwrap();
        assert!(matches!(
            live.reload_if_changed(),
            ReloadOutcome::Reloaded { policies: 0, .. }
        ));
        assert!(live.current().is_empty());
        assert_eq!(live.generation(), 3);
    }

    #[test]
    fn a_vanished_directory_keeps_the_policies() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.cedar", PERMIT);
        let live = LivePolicies::load(dir.path()).unwrap();
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert!(matches!(
            live.reload_if_changed(),
            ReloadOutcome::Refused(_)
        ));
        assert!(matches!(
            live.reload_if_changed(),
            ReloadOutcome::StillRefused
        ));
        assert_eq!(live.current().len(), 1);
    }

    #[test]
    fn the_watcher_reports_changes_and_ends_with_the_set() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.cedar", PERMIT);
        let live = Arc::new(LivePolicies::load(dir.path()).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        live.watch(Duration::from_millis(10), move |outcome, engine| {
            let _ = tx.send((format!("{outcome:?}"), engine.len()));
        })
        .unwrap();
        write(dir.path(), "b.cedar", PERMIT);
        let (outcome, len) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(outcome.starts_with("Reloaded"), "{outcome}");
        assert_eq!(len, 2);
        drop(live);
        // The thread ends, dropping the sender.
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn broken_policies_refuse_to_load() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.cedar", "permit(principal action, resource);");
        let err = LivePolicies::load(dir.path()).unwrap_err();
        assert!(matches!(err, PolicyError::Invalid(_)), "{err}");
    }
}
