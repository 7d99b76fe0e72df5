//! Batch plumbing for `marrow count`: the sorted input list, shards of it, images decoded on CPU
//! threads ahead of the GPU, and progress reporting.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::image_io::{self, Rgb8};

/// Extensions taken when walking a folder (case-insensitive). Files named explicitly are taken
/// whatever their extension: the content decides the format.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "tif", "tiff", "bmp"];

/// The input list: files as given, folders walked recursively in sorted order (hidden entries
/// and marrow's own `*.annotated.png` outputs skipped). Paths keep the form the user gave.
pub fn collect_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| Error::Io {
            path: p.clone(),
            source: e,
        })?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let io = |e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') || name.ends_with(".annotated.png") {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// `--shard i/n`: this process takes inputs i, i+n, i+2n, … of the sorted list (0 ≤ i < n), so
/// that n processes with i = 0..n-1 cover every input exactly once (Slurm `--array=0-N-1` with
/// `$SLURM_ARRAY_TASK_ID`, Kubernetes Indexed Jobs with `$JOB_COMPLETION_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("--shard {s:?}: expected i/n with 0 ≤ i < n, e.g. 0/8");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Indices of `total` inputs that this shard takes.
    pub fn indices(&self, total: usize) -> Vec<usize> {
        (self.index..total).step_by(self.count).collect()
    }
}

/// Decode threads when the user names none: every core but the one feeding the GPU, at least 1.
pub fn default_decode_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

/// One decoded input, in input order.
pub struct Decoded {
    /// Position in the list handed to [`decode_ahead`].
    pub position: usize,
    pub path: PathBuf,
    pub image: Result<Rgb8>,
    pub decode_seconds: f64,
}

/// Decodes `paths` on `threads` CPU threads, at most a few images ahead of the consumer, and
/// yields them in order. Worker `k` decodes positions k, k+threads, …; the iterator reads the
/// workers' channels round-robin, so order is kept without a reorder buffer and memory stays
/// bounded at ~2 images per worker.
pub fn decode_ahead(paths: Vec<PathBuf>, threads: usize) -> impl Iterator<Item = Decoded> {
    let threads = threads.clamp(1, 8).min(paths.len().max(1));
    let mut receivers = Vec::with_capacity(threads);
    for k in 0..threads {
        let (tx, rx) = mpsc::sync_channel::<Decoded>(2);
        let mine: Vec<(usize, PathBuf)> = paths
            .iter()
            .enumerate()
            .skip(k)
            .step_by(threads)
            .map(|(i, p)| (i, p.clone()))
            .collect();
        std::thread::Builder::new()
            .name(format!("marrow-decode-{k}"))
            .spawn(move || {
                for (position, path) in mine {
                    let t = Instant::now();
                    let image = image_io::load_rgb8(&path);
                    let d = Decoded {
                        position,
                        path,
                        image,
                        decode_seconds: t.elapsed().as_secs_f64(),
                    };
                    if tx.send(d).is_err() {
                        return; // the consumer stopped early
                    }
                }
            })
            .expect("spawning a decode thread");
        receivers.push(rx);
    }
    let total = paths.len();
    (0..total).map_while(move |i| receivers[i % threads].recv().ok())
}

/// Progress on stderr: a redrawn bar with rate and ETA on a terminal, one plain line per image
/// otherwise (logs of batch jobs).
pub struct Progress {
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Progress {
        Progress {
            total,
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Records one finished image with a short status (`"23 cells"` or `"FAILED: …"`).
    pub fn tick(&mut self, file: &str, status: &str) {
        self.done += 1;
        if self.quiet {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let rate = self.done as f64 / secs.max(1e-9);
        let eta = (self.total - self.done) as f64 / rate.max(1e-9);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = width * self.done / self.total.max(1);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {}/{} {:.2} img/s ETA {} {}",
                "#".repeat(filled),
                "-".repeat(width - filled),
                self.done,
                self.total,
                rate,
                hms(eta),
                truncate(file, 40)
            );
            if self.done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(
                err,
                "[{}/{}] {file}: {status} ({:.2} img/s, ETA {})",
                self.done,
                self.total,
                rate,
                hms(eta)
            );
        }
        if self.tty && status.starts_with("FAILED") {
            let _ = writeln!(err, "\r\x1b[2K{file}: {status}");
        }
    }
}

fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn truncate(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= n {
        s.to_string()
    } else {
        format!(
            "…{}",
            chars[chars.len() - (n - 1)..].iter().collect::<String>()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_input_once() {
        for total in [0usize, 1, 7, 126, 1000] {
            for n in 1..=9 {
                let mut seen = vec![0u8; total];
                for i in 0..n {
                    let s: Shard = format!("{i}/{n}").parse().unwrap();
                    for j in s.indices(total) {
                        seen[j] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "total {total}, n {n}");
            }
        }
        for bad in ["3/3", "1/0", "a/2", "2", "-1/4", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hms_and_truncate() {
        assert_eq!(hms(3723.4), "1:02:03");
        assert_eq!(truncate("abcdef", 4), "…def");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
