//! The audit log's file: opened for appending (mode `0640`), held under an
//! exclusive advisory lock while open, its last line read to continue the
//! chain.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::machine::{Opened, Storage};
use super::{AuditError, MAX_AUDIT_LINE_BYTES};

/// The file at a path, reopened on rotation.
#[derive(Debug)]
pub(crate) struct FileStorage {
    path: PathBuf,
    file: Option<File>,
    /// Device and inode of `file`, to tell whether the path still names it.
    id: Option<(u64, u64)>,
}

impl FileStorage {
    /// Nothing open yet.
    pub(crate) fn new(path: &Path) -> Self {
        FileStorage {
            path: path.to_path_buf(),
            file: None,
            id: None,
        }
    }

    fn io(&self, source: io::Error) -> AuditError {
        AuditError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("the audit log is not open"))
    }

    fn try_open(&mut self) -> Result<Option<Opened>, AuditError> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o640);
        }
        let mut file = options.open(&self.path).map_err(|e| self.io(e))?;
        let id = file_id(&file).map_err(|e| self.io(e))?;
        if self.file.is_some() && id.is_some() && id == self.id {
            return Ok(None);
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(AuditError::Locked {
                    path: self.path.clone(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(self.io(e)),
        }
        let last_line = last_line(&mut file, &self.path)?;
        let len = file.seek(SeekFrom::End(0)).map_err(|e| self.io(e))?;
        self.file = Some(file);
        self.id = id;
        Ok(Some(Opened { last_line, len }))
    }
}

#[cfg(unix)]
fn file_id(file: &File) -> io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok(Some((meta.dev(), meta.ino())))
}

#[cfg(not(unix))]
fn file_id(_file: &File) -> io::Result<Option<(u64, u64)>> {
    Ok(None)
}

impl Storage for FileStorage {
    fn open(&mut self) -> Result<Option<Opened>, AuditError> {
        let opened = self.try_open();
        if opened.is_err() {
            self.close();
        }
        opened
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file()?.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file()?.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file()?.set_len(len)
    }

    fn close(&mut self) {
        // Dropping the file releases its lock.
        self.file = None;
        self.id = None;
    }
}

/// The last line of `file` (without its newline), or `None` if it is empty.
fn last_line(file: &mut File, path: &Path) -> Result<Option<Vec<u8>>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    if len == 0 {
        return Ok(None);
    }
    // Read at most one line's worth from the end.
    let window = len.min(MAX_AUDIT_LINE_BYTES as u64 + 2);
    file.seek(SeekFrom::Start(len - window)).map_err(io)?;
    let mut buf = Vec::with_capacity(window as usize);
    Read::by_ref(file)
        .take(window)
        .read_to_end(&mut buf)
        .map_err(io)?;
    let Some(body) = buf.strip_suffix(b"\n") else {
        return Err(AuditError::TornTail {
            path: path.to_path_buf(),
        });
    };
    match body.iter().rposition(|&b| b == b'\n') {
        Some(nl) => Ok(Some(body[nl + 1..].to_vec())),
        None if window == len => Ok(Some(body.to_vec())),
        None => Err(AuditError::BadTail {
            path: path.to_path_buf(),
            detail: format!("longer than {MAX_AUDIT_LINE_BYTES} bytes"),
        }),
    }
}
