//! Where `postern enroll` takes its enrollment ticket from (issue 11).
//!
//! A ticket is a secret: until it expires, anyone holding it can enroll a
//! machine of their own, as many times as it has uses left. So it is taken
//! only from places other users of the machine cannot read:
//!
//! - a prompt on the terminal, without echo (`postern enroll` at a terminal,
//!   with no other source);
//! - standard input, one line (`postern enroll -` or `--ticket-stdin`), for
//!   a pipe from a secret manager;
//! - a file (`--ticket-file FILE`), warned about if others can read it (not
//!   refused: container secrets are often mounted readable by all);
//! - `$POSTERN_TICKET`, for automation, read at start-up and removed from
//!   the environment like the other secret variables
//!   (`postern_identity::secret_env`).
//!
//! A ticket given as a command-line argument is **refused**, not merely
//! warned about: every user of the machine can read a process's arguments
//! (`ps`, `/proc/<pid>/cmdline`) for as long as it runs, which for an
//! enrollment is seconds of network round trips, and a script that passes
//! it there leaks it on every run. Refusing before anything is sent keeps
//! that window to a few milliseconds and makes such a script fail the first
//! time, with a message that shows the safe ways and the ticket's id (its
//! code hash, which `postern authority ticket-remove` takes), never the
//! ticket. Errors about a damaged ticket show its shape (length, position of
//! a bad character), never its content.

use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use postern_identity::secret_env::{SecretEnv, TICKET_VAR};
use postern_identity::ticket::{Ticket, MAX_TICKET_LEN, TICKET_PREFIX};
use zeroize::Zeroizing;

/// The most bytes read from a ticket file or standard input: a ticket, and
/// room for the line breaks of a paste.
const READ_LIMIT: usize = MAX_TICKET_LEN + 64;

/// The ways to give a ticket, as error messages list them.
const SAFE_WAYS: &str = "\
Give it one of these ways instead:
    postern enroll                       at a terminal: paste it when asked (it is not shown)
    postern enroll --ticket-file FILE    from a file only you can read (delete it afterwards)
    … | postern enroll -                 from standard input, e.g. a secret manager
    POSTERN_TICKET                       an environment variable set by your automation";

/// The ticket sources `postern enroll` was given.
#[derive(Debug, Clone, Copy, Default)]
pub struct TicketSources<'a> {
    /// The positional argument: `-` (standard input); anything else is
    /// refused.
    pub positional: Option<&'a str>,
    /// `--ticket-file`.
    pub file: Option<&'a Path>,
    /// `--ticket-stdin`.
    pub stdin: bool,
}

/// Reads the ticket from the one source given (see the module
/// documentation); a prompt on the terminal when none is given and there is
/// a terminal.
pub fn read(args: TicketSources<'_>, secrets: &SecretEnv) -> Result<Zeroizing<String>> {
    if let Some(arg) = args.positional.filter(|a| *a != "-") {
        bail!(refusal(arg));
    }
    if let Some(file) = args.file {
        if file
            .as_os_str()
            .as_encoded_bytes()
            .starts_with(TICKET_PREFIX.as_bytes())
        {
            bail!(refusal(&file.to_string_lossy()));
        }
    }
    let stdin = args.stdin || args.positional == Some("-");
    let env = secrets.is_set(TICKET_VAR);
    let given: Vec<&str> = [
        (stdin, "standard input"),
        (args.file.is_some(), "--ticket-file"),
        (env, TICKET_VAR),
    ]
    .into_iter()
    .filter_map(|(given, name)| given.then_some(name))
    .collect();
    if given.len() > 1 {
        bail!(
            "the ticket is given more than one way ({}): give it one way only",
            given.join(" and ")
        );
    }
    if let Some(file) = args.file {
        return read_file(file);
    }
    if env {
        return secrets
            .text(TICKET_VAR)?
            .ok_or_else(|| anyhow!("{TICKET_VAR} is not set"));
    }
    if crate::keys::can_prompt() {
        return prompt();
    }
    if stdin {
        return read_line(&mut std::io::stdin().lock(), "standard input");
    }
    let empty = if secrets.names().contains(&TICKET_VAR) {
        format!(" ({TICKET_VAR} is set, but empty)")
    } else {
        String::new()
    };
    bail!(
        "no enrollment ticket given{empty}, and no terminal to ask for one. {SAFE_WAYS}\n\
         (or log in at your identity provider with --oidc, or renew with --renew)"
    )
}

/// The error for a ticket on the command line: what is wrong, the safe
/// ways, and the ticket's id if `arg` is one. Never `arg` itself.
fn refusal(arg: &str) -> String {
    let withdraw = match Ticket::parse(arg) {
        Ok(ticket) => format!(
            "\nIf others can read your shell history, ask the admin to withdraw this ticket \
             (`postern authority ticket-remove {}`) and to give you a new one.",
            ticket.code.hash().short()
        ),
        Err(_) => String::new(),
    };
    format!(
        "refusing an enrollment ticket on the command line, where other users of this machine \
         can read it (`ps`) and your shell history keeps it; nothing was sent. {SAFE_WAYS}{withdraw}"
    )
}

/// Asks on the terminal, without echo.
fn prompt() -> Result<Zeroizing<String>> {
    rpassword::prompt_password("Enrollment ticket (pstn-ticket:…; paste it, it is not shown): ")
        .map(Zeroizing::new)
        .context("cannot read the ticket from the terminal")
}

/// One line of `reader` (at most [`READ_LIMIT`] bytes).
fn read_line(reader: &mut impl BufRead, what: &str) -> Result<Zeroizing<String>> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(READ_LIMIT + 1));
    reader
        .take(READ_LIMIT as u64 + 1)
        .read_until(b'\n', &mut bytes)
        .with_context(|| format!("cannot read the ticket from {what}"))?;
    text_of(bytes, what)
}

/// The whole of `path` (at most [`READ_LIMIT`] bytes); warns if other users
/// can read it.
fn read_file(path: &Path) -> Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let what = format!("--ticket-file {}", path.display());
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {what}"))?;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_file() && mode & 0o077 != 0 {
            tracing::warn!(
                "{what} can be read by other users (mode {mode:o}): keep tickets in files only \
                 you can read (chmod 600 {}), and delete it once enrolled",
                path.display()
            );
        }
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(READ_LIMIT + 1));
    (&mut file)
        .take(READ_LIMIT as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what}"))?;
    text_of(bytes, &what)
}

/// `bytes` as text, refusing more than [`READ_LIMIT`] bytes, nothing, or
/// bytes that are not UTF-8, without showing any of them.
fn text_of(mut bytes: Zeroizing<Vec<u8>>, what: &str) -> Result<Zeroizing<String>> {
    if bytes.len() > READ_LIMIT {
        bail!(
            "{what} holds more than {READ_LIMIT} bytes, far more than a ticket: give only the \
             ticket your admin gave you"
        );
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        bail!("{what} holds no ticket (it is empty)");
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            // Zeroized on drop.
            let _bytes = Zeroizing::new(e.into_bytes());
            bail!("{what} is not text: a ticket is one line starting with `{TICKET_PREFIX}`")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use postern_identity::ticket::TicketCode;
    use postern_identity::Identifier;

    fn ticket() -> (String, String) {
        let id: Identifier = "P0000000000000000000000000000000000000001".parse().unwrap();
        let ticket = Ticket {
            code: TicketCode::from_bytes([7; 32]),
            authority: id,
            authority_service: "postern-authority".parse().unwrap(),
            relay_addr: "relay.example:4000".into(),
            relay: id,
            expires_at: 4_000_000_000,
        };
        let short = ticket.code.hash().short();
        (ticket.to_token().unwrap().to_string(), short)
    }

    #[test]
    fn a_ticket_on_the_command_line_is_refused_without_being_shown() {
        let (token, short) = ticket();
        let body = token.strip_prefix(TICKET_PREFIX).unwrap();
        let secrets = SecretEnv::default();
        let args = TicketSources {
            positional: Some(&token),
            ..TicketSources::default()
        };
        let message = read(args, &secrets).unwrap_err().to_string();
        assert!(!message.contains(body), "{message}");
        for needle in [
            "refusing",
            "--ticket-file",
            "postern enroll -",
            TICKET_VAR,
            &short,
        ] {
            assert!(message.contains(needle), "lacks {needle:?}: {message}");
        }
        // Not a ticket: still refused, nothing echoed.
        let args = TicketSources {
            positional: Some("something-else"),
            ..TicketSources::default()
        };
        let message = read(args, &secrets).unwrap_err().to_string();
        assert!(
            message.contains("refusing") && !message.contains("something-else"),
            "{message}"
        );
        // A ticket where a file name belongs.
        let path = Path::new(&token);
        let args = TicketSources {
            file: Some(path),
            ..TicketSources::default()
        };
        let message = read(args, &secrets).unwrap_err().to_string();
        assert!(
            message.contains("refusing") && !message.contains(body),
            "{message}"
        );
    }

    #[test]
    fn from_the_environment_or_a_file_but_one_way_only() {
        let (token, _) = ticket();
        let secrets = SecretEnv::from_values([(TICKET_VAR, token.as_str())]);
        let got = read(TicketSources::default(), &secrets).unwrap();
        assert_eq!(*got, token);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ticket");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let from_file = TicketSources {
            file: Some(&file),
            ..TicketSources::default()
        };
        let got = read(from_file, &SecretEnv::default()).unwrap();
        assert_eq!(got.trim(), token);
        let message = read(from_file, &secrets).unwrap_err().to_string();
        assert!(
            message.contains("more than one way") && message.contains(TICKET_VAR),
            "{message}"
        );
    }

    #[test]
    fn lines_and_files_are_bounded_and_never_shown() {
        let (token, _) = ticket();
        let mut input = std::io::Cursor::new(format!("{token}\r\nsecond line\n"));
        let line = read_line(&mut input, "standard input").unwrap();
        assert_eq!(line.trim(), token);

        let huge = "pstn-ticket:".to_owned() + &"A".repeat(10_000);
        let message = read_line(&mut std::io::Cursor::new(huge.clone()), "standard input")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("more than") && !message.contains("AAAA"),
            "{message}"
        );
        let message = read_line(&mut std::io::Cursor::new("\n"), "standard input")
            .unwrap_err()
            .to_string();
        assert!(message.contains("no ticket"), "{message}");
        let mut binary = b"pstn-ticket:secretcode".to_vec();
        binary.push(0xff);
        let message = text_of(Zeroizing::new(binary), "--ticket-file x")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("not text") && !message.contains("secretcode"),
            "{message}"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        std::fs::write(&file, huge).unwrap();
        let args = TicketSources {
            file: Some(&file),
            ..TicketSources::default()
        };
        let message = read(args, &SecretEnv::default()).unwrap_err().to_string();
        assert!(
            message.contains("more than") && !message.contains("AAAA"),
            "{message}"
        );
    }
}
