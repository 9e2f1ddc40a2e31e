//! The environment variables that carry secrets: read once, then gone.
//!
//! [`PASSPHRASE_VAR`] (the passphrase of an encrypted identity),
//! [`KEY_FILE_VAR`] (the key file that opens one) and [`TICKET_VAR`] (an
//! enrollment ticket) are how automation hands Postern a secret without
//! putting it on the command line, where every user of the machine can read
//! it. Left in the environment, they would reach every child process (the
//! browser opened for an OpenID Connect login, any tool started later), and
//! stay readable in `/proc/<pid>/environ` for as long as the process runs.
//!
//! So a program calls [`SecretEnv::take_from_process`] first thing in
//! `main`, while it has a single thread. It copies each variable into a
//! zeroizing buffer, removes it from the environment (`std::env::remove_var`,
//! which is sound only while no other thread reads the environment), and on
//! Linux also wipes it from the process's *initial* environment block: the
//! memory the kernel filled at `exec`, which `/proc/<pid>/environ` shows and
//! which `remove_var` does not change (the C library only drops its pointer
//! to the entry). The bytes are overwritten through `/proc/self/mem` once
//! nothing in the process refers to them any more: the C library no longer
//! lists the entry, and Rust only ever read copies.
//!
//! Every child process gets the variables removed once more with
//! [`scrub_child`], as a second guard should a future code path set one.

use std::ffi::OsStr;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::process::Command;

use zeroize::Zeroizing;

/// The passphrase of an identity encrypted with a passphrase.
pub const PASSPHRASE_VAR: &str = "POSTERN_PASSPHRASE";
/// The key file that opens an identity encrypted with a key.
pub const KEY_FILE_VAR: &str = "POSTERN_KEY_FILE";
/// An enrollment ticket (`pstn-ticket:…`) for `postern enroll`.
pub const TICKET_VAR: &str = "POSTERN_TICKET";
/// Every variable [`SecretEnv::take_from_process`] takes and [`scrub_child`]
/// removes.
pub const SECRET_VARS: [&str; 3] = [PASSPHRASE_VAR, KEY_FILE_VAR, TICKET_VAR];

/// The longest initial environment block read when wiping (Linux caps the
/// arguments and environment of `exec` far below this).
const MAX_ENV_BLOCK: u64 = 64 * 1024 * 1024;

/// A secret variable's value is not text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretEnvError {
    /// The value is not valid UTF-8.
    #[error("{var} is not valid UTF-8: set it to the plain text value")]
    NotUtf8 {
        /// The variable.
        var: &'static str,
    },
}

/// Why the secret variables could not be wiped from `/proc/<pid>/environ`.
/// They are still removed from the environment that child processes
/// inherit; only processes of the same user (and root) can read that file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WipeError {
    /// `/proc/self/stat` or `/proc/self/mem` could not be read or written
    /// (no `/proc`, or a security module forbids it).
    #[error("cannot wipe {vars} from /proc/{pid}/environ ({what}: {source}); they are removed from the environment of child processes, but processes of this user can still read them there")]
    Io {
        /// The variables that were set.
        vars: String,
        /// This process.
        pid: u32,
        /// What failed.
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// `/proc/self/stat` does not show where the environment block is.
    #[error("cannot wipe {vars} from /proc/{pid}/environ (the kernel does not say where the environment block is); they are removed from the environment of child processes, but processes of this user can still read them there")]
    NoBounds {
        /// The variables that were set.
        vars: String,
        /// This process.
        pid: u32,
    },
}

/// The secret variables as they were when the process started, held in
/// zeroizing buffers. `Debug` shows which are set, never their values.
#[derive(Default)]
pub struct SecretEnv {
    vars: Vec<(&'static str, Zeroizing<Vec<u8>>)>,
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.vars.iter().map(|(name, _)| *name))
            .finish()
    }
}

impl SecretEnv {
    /// Takes every variable of [`SECRET_VARS`] out of this process, as the
    /// module documentation describes, and returns their values with the
    /// outcome of the wipe (`Ok(n)`: `n` entries wiped from the initial
    /// environment block; always `Ok(0)` off Linux).
    ///
    /// Call it at the very start of `main`, before any thread exists
    /// (`std::env::remove_var` is not safe while another thread reads the
    /// environment) and before any child process is started.
    pub fn take_from_process() -> (SecretEnv, Result<usize, WipeError>) {
        let mut vars = Vec::new();
        for name in SECRET_VARS {
            if let Some(value) = std::env::var_os(name) {
                vars.push((name, Zeroizing::new(into_bytes(value))));
                std::env::remove_var(name);
            }
        }
        let taken = SecretEnv { vars };
        let wiped = if taken.vars.is_empty() {
            Ok(0)
        } else {
            wipe_initial_environment(&taken.names())
        };
        (taken, wiped)
    }

    /// The given values, as if taken from the environment (for tests and
    /// embedders that get them elsewhere). Names outside [`SECRET_VARS`]
    /// are ignored.
    pub fn from_values<'a>(values: impl IntoIterator<Item = (&'a str, &'a str)>) -> SecretEnv {
        let vars = values
            .into_iter()
            .filter_map(|(name, value)| {
                let name = SECRET_VARS.into_iter().find(|known| *known == name)?;
                Some((name, Zeroizing::new(value.as_bytes().to_vec())))
            })
            .collect();
        SecretEnv { vars }
    }

    /// The names of the variables that were set (even to an empty value).
    pub fn names(&self) -> Vec<&'static str> {
        self.vars.iter().map(|(name, _)| *name).collect()
    }

    /// Whether `var` was set to a non-empty value.
    pub fn is_set(&self, var: &str) -> bool {
        self.raw(var).is_some_and(|v| !v.is_empty())
    }

    /// The value of `var` as text: `None` if it was not set, an error if it
    /// is not UTF-8. An empty value is returned as it is.
    pub fn text(&self, var: &str) -> Result<Option<Zeroizing<String>>, SecretEnvError> {
        let Some((name, value)) = self.vars.iter().find(|(name, _)| *name == var) else {
            return Ok(None);
        };
        let text = std::str::from_utf8(value).map_err(|_| SecretEnvError::NotUtf8 { var: name })?;
        Ok(Some(Zeroizing::new(text.to_owned())))
    }

    /// [`KEY_FILE_VAR`] as a path, if set to a non-empty value (a path is
    /// not secret, but the variable is removed all the same).
    pub fn key_file(&self) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        self.raw(KEY_FILE_VAR)
            .filter(|v| !v.is_empty())
            .map(|v| PathBuf::from(OsStr::from_bytes(v)))
    }

    fn raw(&self, var: &str) -> Option<&[u8]> {
        self.vars
            .iter()
            .find(|(name, _)| *name == var)
            .map(|(_, value)| value.as_slice())
    }
}

fn into_bytes(value: std::ffi::OsString) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    value.into_vec()
}

/// Removes every variable of [`SECRET_VARS`] from the environment `command`
/// passes to its child, whatever this process's environment holds.
pub fn scrub_child(command: &mut Command) -> &mut Command {
    for name in SECRET_VARS {
        command.env_remove(name);
    }
    command
}

#[cfg(target_os = "linux")]
fn wipe_initial_environment(names: &[&'static str]) -> Result<usize, WipeError> {
    use std::os::unix::fs::FileExt;
    let pid = std::process::id();
    let vars = names.join(", ");
    let io = |what: &'static str| {
        let vars = vars.clone();
        move |source| WipeError::Io {
            vars,
            pid,
            what,
            source,
        }
    };
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(io("reading /proc/self/stat"))?;
    let block = env_block_bounds(&stat)
        .filter(|range| range.end - range.start <= MAX_ENV_BLOCK)
        .ok_or_else(|| WipeError::NoBounds {
            vars: vars.clone(),
            pid,
        })?;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(io("opening /proc/self/mem"))?;
    // The block holds the secrets too: zeroize this copy of it.
    let mut bytes = Zeroizing::new(vec![
        0u8;
        usize::try_from(block.end - block.start).unwrap_or(0)
    ]);
    mem.read_exact_at(&mut bytes, block.start)
        .map_err(io("reading /proc/self/mem"))?;
    let entries = entries_to_wipe(&bytes, names);
    for entry in &entries {
        let zeros = vec![0u8; entry.len()];
        mem.write_all_at(&zeros, block.start + entry.start as u64)
            .map_err(io("writing /proc/self/mem"))?;
    }
    Ok(entries.len())
}

#[cfg(not(target_os = "linux"))]
fn wipe_initial_environment(_names: &[&'static str]) -> Result<usize, WipeError> {
    Ok(0)
}

/// Where the initial environment block is, from the text of
/// `/proc/<pid>/stat`: fields 50 (`env_start`) and 51 (`env_end`), counted
/// after the command name (which may itself hold spaces and parentheses).
fn env_block_bounds(stat: &str) -> Option<Range<u64>> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (the state) is the first one after the name.
    let mut fields = after_name.split_ascii_whitespace().skip(50 - 3);
    let start: u64 = fields.next()?.parse().ok()?;
    let end: u64 = fields.next()?.parse().ok()?;
    (start > 0 && start < end).then_some(start..end)
}

/// The byte ranges (name, `=` and value) of the entries of the NUL-separated
/// environment block `block` that set one of `names`.
fn entries_to_wipe(block: &[u8], names: &[&str]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for entry in block.split(|b| *b == 0) {
        let matches = names.iter().any(|name| {
            entry.len() > name.len()
                && entry.starts_with(name.as_bytes())
                && entry[name.len()] == b'='
        });
        if matches {
            ranges.push(start..start + entry.len());
        }
        start += entry.len() + 1;
    }
    ranges
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_only_the_named_entries() {
        let block = b"PATH=/bin\0POSTERN_PASSPHRASE=hunter2\0POSTERN_PASSPHRASE_HINT=x\0\
                      XPOSTERN_TICKET=y\0POSTERN_TICKET=pstn-ticket:abc\0POSTERN_KEY_FILE=\0HOME=/root\0";
        let ranges = entries_to_wipe(block, &SECRET_VARS);
        let found: Vec<&[u8]> = ranges.iter().map(|r| &block[r.clone()]).collect();
        assert_eq!(
            found,
            [
                &b"POSTERN_PASSPHRASE=hunter2"[..],
                b"POSTERN_TICKET=pstn-ticket:abc",
                b"POSTERN_KEY_FILE="
            ]
        );
        // Wiping them leaves every other entry as it was.
        let mut wiped = block.to_vec();
        for r in ranges {
            wiped[r].fill(0);
        }
        let left: Vec<&[u8]> = wiped.split(|b| *b == 0).filter(|e| !e.is_empty()).collect();
        assert_eq!(
            left,
            [
                &b"PATH=/bin"[..],
                b"POSTERN_PASSPHRASE_HINT=x",
                b"XPOSTERN_TICKET=y",
                b"HOME=/root"
            ]
        );
        assert!(entries_to_wipe(b"", &SECRET_VARS).is_empty());
        assert!(entries_to_wipe(b"POSTERN_TICKET", &SECRET_VARS).is_empty());
    }

    #[test]
    fn reads_the_environment_bounds_from_stat() {
        // 52 fields; the name holds a space and a parenthesis.
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[50 - 3] = "140737488347000".into();
        fields[51 - 3] = "140737488348000".into();
        let stat = format!("4242 (post ern) x) {}\n", fields.join(" "));
        assert_eq!(
            env_block_bounds(&stat),
            Some(140_737_488_347_000..140_737_488_348_000)
        );
        // Old kernels (fewer fields), hidden values (0) and garbage.
        assert_eq!(env_block_bounds("1 (init) S 0 1 1"), None);
        fields[50 - 3] = "0".into();
        fields[51 - 3] = "0".into();
        assert_eq!(
            env_block_bounds(&format!("1 (x) {}", fields.join(" "))),
            None
        );
        assert_eq!(env_block_bounds("no parenthesis"), None);
    }

    #[test]
    fn this_kernel_reports_a_block_that_holds_the_environment() {
        #[cfg(target_os = "linux")]
        {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
            let block = env_block_bounds(&stat).unwrap();
            let environ = std::fs::read("/proc/self/environ").unwrap();
            assert_eq!((block.end - block.start) as usize, environ.len());
        }
    }

    #[test]
    fn children_never_get_the_variables() {
        let mut command = Command::new("true");
        command
            .env("POSTERN_PASSPHRASE", "set by a bug")
            .env("KEEP", "1");
        scrub_child(&mut command);
        let envs: Vec<_> = command.get_envs().collect();
        for name in SECRET_VARS {
            assert!(
                envs.contains(&(OsStr::new(name), None)),
                "{name} is not removed: {envs:?}"
            );
        }
        assert!(envs.contains(&(OsStr::new("KEEP"), Some(OsStr::new("1")))));
    }

    #[test]
    fn values_are_text_on_demand_and_never_shown() {
        let env = SecretEnv::from_values([
            (PASSPHRASE_VAR, "correct horse"),
            (KEY_FILE_VAR, ""),
            ("PATH", "/bin"),
        ]);
        assert_eq!(
            env.text(PASSPHRASE_VAR)
                .unwrap()
                .as_deref()
                .map(String::as_str),
            Some("correct horse")
        );
        assert!(env.is_set(PASSPHRASE_VAR));
        assert!(!env.is_set(KEY_FILE_VAR) && env.key_file().is_none());
        assert_eq!(
            env.text(KEY_FILE_VAR)
                .unwrap()
                .as_deref()
                .map(String::as_str),
            Some("")
        );
        assert_eq!(env.text(TICKET_VAR), Ok(None));
        assert_eq!(env.names(), [PASSPHRASE_VAR, KEY_FILE_VAR]);
        let shown = format!("{env:?}");
        assert!(
            shown.contains(PASSPHRASE_VAR) && !shown.contains("horse"),
            "{shown}"
        );

        let bad = SecretEnv {
            vars: vec![(PASSPHRASE_VAR, Zeroizing::new(vec![0xff, 0xfe]))],
        };
        assert_eq!(
            bad.text(PASSPHRASE_VAR),
            Err(SecretEnvError::NotUtf8 {
                var: PASSPHRASE_VAR
            })
        );
    }
}
