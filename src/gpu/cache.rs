//! The on-disk pipeline cache: wgpu's `PipelineCache` (a Vulkan `VkPipelineCache` underneath)
//! saved between runs, so that a driver which honours it skips compiling the kernels again.
//!
//! The file lives in the user's cache directory (`MARROW_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/marrow`, else `~/.cache/marrow`; `MARROW_NO_CACHE=1` turns it off). Its name
//! is wgpu's [`wgpu::util::pipeline_cache_key`] for the adapter plus a hash of everything that
//! could make the data stale: marrow's version, the adapter and driver, and the text of every
//! kernel in `shaders/` and `shaders/common/`. A new marrow or a new driver therefore never loads an old file, and the
//! old file is removed at the next save.
//!
//! The driver's data is wrapped in an envelope with its length and SHA-256, because wgpu checks
//! only its own header and passes the rest to the driver as is: a truncated or bit-flipped file is
//! ignored with a warning (and rewritten), never an error. Writes are atomic (a temporary file in
//! the same directory, then a rename), so concurrent marrow processes (shards) never read half a
//! file; the last writer wins.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Every kernel source in `shaders/`, hashed into the cache key with the shared snippets of
/// `shaders/common/` ([`super::wgsl::COMMON`]); tests/startup.rs checks that the list matches the
/// folder, so a new kernel cannot be left out. (A stale key could only waste the file: Vulkan
/// pipeline caches are looked up by the shader's own hash, never by name.)
pub const SHADER_SOURCES: [(&str, &str); 10] = [
    ("box_head.wgsl", include_str!("../../shaders/box_head.wgsl")),
    ("conv2d.wgsl", include_str!("../../shaders/conv2d.wgsl")),
    ("linalg.wgsl", include_str!("../../shaders/linalg.wgsl")),
    ("nms.wgsl", include_str!("../../shaders/nms.wgsl")),
    ("pool.wgsl", include_str!("../../shaders/pool.wgsl")),
    ("refine.wgsl", include_str!("../../shaders/refine.wgsl")),
    (
        "roi_align.wgsl",
        include_str!("../../shaders/roi_align.wgsl"),
    ),
    ("rpn.wgsl", include_str!("../../shaders/rpn.wgsl")),
    ("topk.wgsl", include_str!("../../shaders/topk.wgsl")),
    (
        "transform.wgsl",
        include_str!("../../shaders/transform.wgsl"),
    ),
];

const MAGIC: &[u8; 8] = b"MARROWPC";
const FORMAT: u32 = 1;
const HEADER: usize = 8 + 4 + 32 + 8 + 32;
/// Files this marrow writes start with this, so that a save may remove its own stale files.
const PREFIX: &str = "marrow-pipelines-";

/// Where the pipeline cache lives, or that there is none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PipelineCacheSetting {
    /// `MARROW_NO_CACHE=1` (any value but empty or `0`) disables it; `MARROW_CACHE_DIR` names the
    /// folder; else `$XDG_CACHE_HOME/marrow`, `~/.cache/marrow` (`%LOCALAPPDATA%\marrow` on
    /// Windows).
    #[default]
    FromEnv,
    /// No on-disk cache: every run compiles every kernel (the driver's own cache aside).
    Off,
    /// This folder, whatever the environment says (tests use a temporary one).
    Dir(PathBuf),
}

impl PipelineCacheSetting {
    /// The folder, or why there is none.
    pub fn resolve(&self) -> Result<PathBuf, String> {
        self.resolve_with(|k| std::env::var_os(k))
    }

    /// [`PipelineCacheSetting::resolve`] with the environment given as a lookup (tests).
    pub fn resolve_with(
        &self,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<PathBuf, String> {
        match self {
            PipelineCacheSetting::Off => Err("disabled".into()),
            PipelineCacheSetting::Dir(d) => Ok(d.clone()),
            PipelineCacheSetting::FromEnv => {
                let var = |k: &str| env(k).filter(|v| !v.is_empty());
                if let Some(v) = var("MARROW_NO_CACHE") {
                    if v != "0" {
                        return Err("disabled by MARROW_NO_CACHE".into());
                    }
                }
                if let Some(d) = var("MARROW_CACHE_DIR") {
                    return Ok(PathBuf::from(d));
                }
                if let Some(d) = var("XDG_CACHE_HOME").map(PathBuf::from) {
                    if d.is_absolute() {
                        return Ok(d.join("marrow"));
                    }
                }
                if cfg!(windows) {
                    if let Some(d) = var("LOCALAPPDATA") {
                        return Ok(PathBuf::from(d).join("marrow"));
                    }
                }
                match var("HOME") {
                    Some(h) => Ok(PathBuf::from(h).join(".cache").join("marrow")),
                    None => Err("no cache directory (set MARROW_CACHE_DIR)".into()),
                }
            }
        }
    }
}

/// What happened to the on-disk pipeline cache in this process (for `--timings` and tests).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PipelineCacheReport {
    /// A cache is attached to every pipeline this process creates.
    pub enabled: bool,
    /// Why there is none (`MARROW_NO_CACHE`, the backend has none, …).
    pub off_reason: Option<String>,
    /// The cache file (whether or not it existed).
    pub path: Option<PathBuf>,
    /// Bytes of driver data handed to the driver at start-up (0: no file, or it was ignored).
    pub loaded_bytes: u64,
    /// Seconds spent reading, checking and handing the file to the driver.
    pub load_secs: f64,
    /// The file existed but was not used (corrupt, unreadable, rejected by wgpu or the driver).
    pub warning: Option<String>,
    /// Bytes of driver data in the last file written by this process (0: none written).
    pub saved_bytes: u64,
}

/// Key material: anything that could make a cache file stale.
pub(crate) fn cache_key(info: &wgpu::AdapterInfo) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(env!("CARGO_PKG_VERSION").as_bytes());
    field(b"wgpu 30");
    field(format!("{:?}", info.backend).as_bytes());
    field(info.name.as_bytes());
    field(&info.vendor.to_le_bytes());
    field(&info.device.to_le_bytes());
    field(info.driver.as_bytes());
    field(info.driver_info.as_bytes());
    for (name, src) in SHADER_SOURCES.iter().chain(super::wgsl::COMMON) {
        field(name.as_bytes());
        field(src.as_bytes());
    }
    h.finalize().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cache file for this adapter and key, or `None` where wgpu has no cache for the backend.
pub(crate) fn cache_file(dir: &Path, info: &wgpu::AdapterInfo, key: &[u8; 32]) -> Option<PathBuf> {
    let adapter = wgpu::util::pipeline_cache_key(info)?;
    Some(dir.join(format!("{PREFIX}{adapter}-{}.bin", hex(&key[..8]))))
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Wraps driver data in the envelope.
pub(crate) fn encode(key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(payload));
    out.extend_from_slice(payload);
    out
}

/// The driver data inside a file, or why the file cannot be used.
pub(crate) fn decode<'a>(key: &[u8; 32], file: &'a [u8]) -> Result<&'a [u8], String> {
    if file.len() < HEADER {
        return Err(format!(
            "{} bytes, shorter than the {HEADER}-byte header",
            file.len()
        ));
    }
    if &file[0..8] != MAGIC {
        return Err("not a marrow pipeline cache (bad magic)".into());
    }
    let format = u32::from_le_bytes(file[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(format!("format {format}, this marrow reads {FORMAT}"));
    }
    if &file[12..44] != key {
        return Err("made for another marrow, driver or kernel set".into());
    }
    let len = u64::from_le_bytes(file[44..52].try_into().expect("8 bytes"));
    let payload = &file[HEADER..];
    if payload.len() as u64 != len {
        return Err(format!(
            "{} bytes of data, the header says {len} (truncated or extended)",
            payload.len()
        ));
    }
    if sha256(payload)[..] != file[52..84] {
        return Err("checksum mismatch (corrupt)".into());
    }
    Ok(payload)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, flushed, then renamed over.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes this adapter's cache files made for another key (an older marrow, driver or kernel
/// set), so that upgrades do not pile files up. Best effort.
pub(crate) fn remove_stale(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    // "marrow-pipelines-<adapter>-<hash>.bin": same prefix up to the hash.
    let Some(stem) = name.rsplit_once('-').map(|(s, _)| format!("{s}-")) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        if n != name && n.starts_with(&stem) && n.ends_with(".bin") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
