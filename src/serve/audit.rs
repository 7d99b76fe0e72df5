//! The case's audit log: `audit.jsonl`, one JSON event a line, append-only.
//!
//! Durability rule: [`AuditLog::append`] returns only after the line is written and `fsync`ed
//! (`sync_data`), and the HTTP handler answers only after that, so an acknowledged change
//! survives a crash or a power cut. Replay ([`AuditLog::open`]) tolerates exactly one kind of
//! damage, the one a crash can cause: a torn last line (no newline, not valid JSON), which was
//! never acknowledged; it is cut off so that the next append starts on a clean line. Damage
//! anywhere else is an error naming the line: a case whose history cannot be read must not be
//! silently rebuilt from part of it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A cell's reviewable state: what an event's `before` and `after` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellSnapshot {
    pub bbox: [f32; 4],
    /// Model label (1-based).
    pub label: usize,
    pub class: String,
    /// Counted in the differential (a deleted cell never is).
    pub counted: bool,
    /// Removed by the reviewer (a false positive, or an undone drawn cell).
    pub deleted: bool,
}

/// One line of `audit.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, 3, … in file order.
    pub seq: u64,
    /// UTC, RFC 3339.
    pub time: String,
    pub reviewer: String,
    /// What happened: `reclassify`, `accept`, `delete`, `restore`, `add`, `undo`, `redo`
    /// (cell events), `upload`, `signoff`, `reopen` (case events).
    pub op: String,
    /// The image's key in the case (its path relative to the case's image folder, or
    /// `uploads/…`); absent for case events.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub image: Option<String>,
    /// The cell's id (`d<n>` for the model's n-th detection, `a<n>` for a drawn cell).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cell: Option<String>,
    /// The cell before and after the change (`before` is null for a cell just drawn).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub before: Option<CellSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub after: Option<CellSnapshot>,
    /// Case events' details: an upload's original name and SHA-256, a sign-off's note.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<serde_json::Value>,
}

/// The open log, positioned for appends.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
}

/// What [`AuditLog::open`] read back.
pub struct Replay {
    pub events: Vec<Event>,
    /// Set when a torn last line was cut off (bytes dropped), for the server's start-up message.
    pub torn_bytes: Option<usize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path` and reads every event back.
    pub fn open(path: &Path) -> Result<(AuditLog, Replay)> {
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io(path))?;
        if !existed {
            // The new file's directory entry must be durable too, or a crash can lose the file
            // with every event in it.
            sync_dir(path)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(path))?;
        let (events, good_len) = parse(&bytes, path)?;
        let mut torn_bytes = None;
        if good_len < bytes.len() {
            torn_bytes = Some(bytes.len() - good_len);
            file.set_len(good_len as u64).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        } else if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            // A complete last event whose newline was lost: keep it, end its line.
            file.write_all(b"\n").map_err(io(path))?;
            file.sync_data().map_err(io(path))?;
        }
        let next_seq = events.last().map(|e| e.seq + 1).unwrap_or(1);
        Ok((
            AuditLog {
                path: path.to_path_buf(),
                file,
                next_seq,
            },
            Replay { events, torn_bytes },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Events written so far.
    pub fn len(&self) -> usize {
        (self.next_seq - 1) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == 1
    }

    /// Numbers `event`, writes it as one line and fsyncs; returns it as written. Only after
    /// this returns may the change be applied and acknowledged.
    pub fn append(&mut self, mut event: Event) -> Result<Event> {
        event.seq = self.next_seq;
        let mut line = serde_json::to_vec(&event)
            .map_err(|e| Error::Invalid(format!("cannot serialise an audit event: {e}")))?;
        line.push(b'\n');
        // One write call per line: with O_APPEND a crash leaves at most this line torn.
        self.file.write_all(&line).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        self.next_seq += 1;
        Ok(event)
    }
}

/// Parses the log's bytes: the events and the length of the well-formed prefix.
fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<Event>, usize)> {
    let mut events: Vec<Event> = Vec::new();
    let mut pos = 0;
    let mut line_no = 0;
    while pos < bytes.len() {
        line_no += 1;
        let (line, next, complete) = match bytes[pos..].iter().position(|&b| b == b'\n') {
            Some(i) => (&bytes[pos..pos + i], pos + i + 1, true),
            None => (&bytes[pos..], bytes.len(), false),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            pos = next;
            continue;
        }
        match serde_json::from_slice::<Event>(line) {
            Ok(e) => {
                let expected = events.last().map(|l| l.seq + 1).unwrap_or(1);
                if e.seq != expected {
                    return Err(Error::Invalid(format!(
                        "{}: line {line_no}: event seq {} where {expected} was expected: the \
                         log was edited or two servers wrote to it",
                        path.display(),
                        e.seq
                    )));
                }
                events.push(e);
            }
            // A crash tears at most the last line, and only one without its newline.
            Err(_) if !complete => return Ok((events, pos)),
            Err(err) => {
                return Err(Error::Invalid(format!(
                    "{}: line {line_no} is not an audit event ({err}); the log is damaged \
                     before its end, which a crash cannot cause: restore it from a backup",
                    path.display()
                )))
            }
        }
        pos = next;
    }
    Ok((events, bytes.len()))
}

/// fsyncs the folder holding `path`, so that a file created or renamed in it survives a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Opening a directory for reading works on Unix; elsewhere directory fsync is not a thing.
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same folder,
/// fsynced, renamed over `path`, folder fsynced. Readers see the old or the new file, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: &str) -> Event {
        Event {
            seq: 0,
            time: "2026-01-01T00:00:00Z".into(),
            reviewer: "t".into(),
            op: op.into(),
            image: None,
            cell: None,
            before: None,
            after: None,
            detail: None,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("marrow-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("audit.jsonl")
    }

    #[test]
    fn appends_replay_in_order() {
        let p = tmp("order");
        let (mut log, r) = AuditLog::open(&p).unwrap();
        assert!(r.events.is_empty());
        for op in ["a", "b", "c"] {
            log.append(ev(op)).unwrap();
        }
        drop(log);
        let (log, r) = AuditLog::open(&p).unwrap();
        assert_eq!(
            r.events.iter().map(|e| e.op.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(r.events[2].seq, 3);
        assert_eq!(log.len(), 3);
    }

    #[test]
    fn torn_last_line_is_cut_and_appends_continue() {
        let p = tmp("torn");
        let (mut log, _) = AuditLog::open(&p).unwrap();
        log.append(ev("a")).unwrap();
        log.append(ev("b")).unwrap();
        drop(log);
        let full = std::fs::read(&p).unwrap();
        // Every cut inside the last line: the first event survives, the second is dropped.
        let first_len = full.iter().position(|&b| b == b'\n').unwrap() + 1;
        for cut in first_len + 1..full.len() - 1 {
            std::fs::write(&p, &full[..cut]).unwrap();
            let (mut log, r) = AuditLog::open(&p).unwrap();
            assert_eq!(r.events.len(), 1, "cut at {cut}");
            assert_eq!(r.torn_bytes, Some(cut - first_len));
            log.append(ev("c")).unwrap();
            drop(log);
            let (_, r) = AuditLog::open(&p).unwrap();
            assert_eq!(r.events.len(), 2);
            assert_eq!(r.events[1].op, "c");
            assert_eq!(r.events[1].seq, 2);
        }
        // A complete last line without its newline is kept.
        std::fs::write(&p, &full[..full.len() - 1]).unwrap();
        let (_, r) = AuditLog::open(&p).unwrap();
        assert_eq!(r.events.len(), 2);
        assert_eq!(std::fs::read(&p).unwrap(), full);
    }

    #[test]
    fn damage_before_the_end_is_an_error() {
        let p = tmp("damaged");
        let (mut log, _) = AuditLog::open(&p).unwrap();
        log.append(ev("a")).unwrap();
        log.append(ev("b")).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replacen("{", "{x", 1)).unwrap();
        let err = AuditLog::open(&p).err().unwrap().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
