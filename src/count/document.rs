//! The JSON report of a counting run — `{"provenance": {...}, "images": [...], "summary": {...}}` —
//! and `marrow merge`, which combines the reports of shards of one input list into one.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ImageCount, ModelInfo, Summary};
use crate::error::{Error, Result};

/// Printed wherever a clinician reads results.
pub const NOTICE: &str = "For research use only. Not for diagnostic use.";

/// One input image's entry: its count, or the reason it could not be counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageEntry {
    Counted(ImageCount),
    Failed { file: String, error: String },
}

impl ImageEntry {
    pub fn file(&self) -> &str {
        match self {
            ImageEntry::Counted(c) => &c.file,
            ImageEntry::Failed { file, .. } => file,
        }
    }
    pub fn counted(&self) -> Option<&ImageCount> {
        match self {
            ImageEntry::Counted(c) => Some(c),
            ImageEntry::Failed { .. } => None,
        }
    }
}

/// Everything needed to know how a count was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub marrow_version: String,
    pub notice: String,
    pub model: ModelInfo,
    /// Counting threshold (score ≥ threshold is counted).
    pub threshold: f32,
    pub adapter: String,
    /// UTC time the run started, RFC 3339.
    pub time: String,
    /// "auto" | "off" | field size in pixels, as requested; per-image entries say whether an
    /// image was actually cut (`tiles`).
    pub tiling: String,
    pub tile_overlap: Option<u32>,
    /// Whether the weights' refinement head produced the detections.
    pub refinement_head: bool,
    /// `i/n` when this report covers one shard of the input list.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shard: Option<String>,
    /// Images in the whole (unsharded) input list.
    pub inputs_total: usize,
    /// Position of each image of this report in the whole sorted input list (same order as
    /// `images`), so that shards merge back into the original order.
    pub input_indices: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub provenance: Provenance,
    pub images: Vec<ImageEntry>,
    pub summary: Summary,
}

impl Report {
    pub fn new(provenance: Provenance, images: Vec<ImageEntry>, target: Option<usize>) -> Report {
        let summary = Summary::of(
            &provenance.model,
            images.iter().map(|e| e.counted().ok_or(())),
            target,
        );
        Report {
            provenance,
            images,
            summary,
        }
    }

    pub fn read(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let r: Report = serde_json::from_str(&text).map_err(|e| {
            Error::Invalid(format!(
                "{}: not a marrow count report: {e}",
                path.display()
            ))
        })?;
        if r.provenance.input_indices.len() != r.images.len() {
            return Err(Error::Invalid(format!(
                "{}: {} input indices for {} images",
                path.display(),
                r.provenance.input_indices.len(),
                r.images.len()
            )));
        }
        Ok(r)
    }
}

/// A reviewed case (`marrow serve`'s export): the corrected counts as a plain [`Report`] (its
/// fields at the top level, so every reader of count reports reads this too: [`Report::read`],
/// `marrow merge`, the CSV writer) plus `review`: who reviewed, whether the case is signed off,
/// what the model said, and every cell the reviewer changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewedReport {
    #[serde(flatten)]
    pub report: Report,
    pub review: Review,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    /// The case's name (its image folder) and case folder.
    pub case: String,
    pub case_dir: String,
    /// "signed off" or "in review".
    pub status: String,
    /// Who signed the case off, and when (RFC 3339), when it is.
    pub signed_off_by: Option<String>,
    pub signed_off_at: Option<String>,
    /// Everyone who changed a cell, in order of first change.
    pub reviewers: Vec<String>,
    /// When this export was made (RFC 3339).
    pub exported_at: String,
    /// The audit log (JSONL, one event a line) and how many events it held at export.
    pub audit_log: String,
    pub audit_events: usize,
    /// The model's own totals over the case, before any correction.
    pub model_summary: Summary,
    /// Every cell whose reviewed state differs from the model's, in image order.
    pub changes: Vec<CellChange>,
}

/// One cell the reviewer changed: what the model said and what the reviewer decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellChange {
    pub image: String,
    /// The cell's id in the case (`d<n>` = the model's n-th detection, `a<n>` = drawn by hand).
    pub cell: String,
    /// "reclassified", "deleted", "added", "confirmed" (an uncounted detection counted as is) or
    /// "uncounted".
    pub change: String,
    pub model: Option<CellState>,
    pub reviewed: Option<CellState>,
}

/// A cell's class and whether it is counted, as the model or the reviewer left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellState {
    pub class: String,
    pub label: usize,
    pub counted: bool,
    pub bbox: [f32; 4],
    /// The model's confidence; absent for a cell drawn by the reviewer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub score: Option<f32>,
}

/// Combines shard reports of one run into one report in the original input order. Refuses
/// reports made with different models, thresholds or input lists, overlapping shards, and (unless
/// `allow_partial`) a union that does not cover the input list.
pub fn merge(parts: &[(std::path::PathBuf, Report)], allow_partial: bool) -> Result<Report> {
    let (first_path, first) = parts
        .first()
        .ok_or_else(|| Error::Invalid("merge: no reports given".into()))?;
    let p0 = &first.provenance;
    let mut rows: Vec<(usize, ImageEntry)> = Vec::new();
    let mut seen = vec![None::<&Path>; p0.inputs_total];
    for (path, r) in parts {
        let p = &r.provenance;
        let differs = |what: &str| {
            Error::Invalid(format!(
                "merge: {} and {} differ in {what}: they are not shards of one run",
                first_path.display(),
                path.display()
            ))
        };
        if p.model.sha256 != p0.model.sha256 {
            return Err(differs("model (sha256)"));
        }
        if p.threshold != p0.threshold || p.tiling != p0.tiling || p.tile_overlap != p0.tile_overlap
        {
            return Err(differs("threshold or tiling"));
        }
        if p.inputs_total != p0.inputs_total {
            return Err(differs("the size of the input list"));
        }
        for (&i, e) in p.input_indices.iter().zip(&r.images) {
            let slot = seen.get_mut(i).ok_or_else(|| {
                Error::Invalid(format!(
                    "merge: {}: input index {i} ≥ inputs_total {}",
                    path.display(),
                    p0.inputs_total
                ))
            })?;
            if let Some(other) = slot {
                return Err(Error::Invalid(format!(
                    "merge: input {i} ({}) is in both {} and {}",
                    e.file(),
                    other.display(),
                    path.display()
                )));
            }
            *slot = Some(path.as_path());
            rows.push((i, e.clone()));
        }
    }
    let missing = seen.iter().filter(|s| s.is_none()).count();
    if missing > 0 && !allow_partial {
        return Err(Error::Invalid(format!(
            "merge: {missing} of {} inputs are in no report (a shard is missing; pass --allow-partial to merge anyway)",
            p0.inputs_total
        )));
    }
    rows.sort_by_key(|(i, _)| *i);
    let mut prov = p0.clone();
    prov.shard = None;
    prov.input_indices = rows.iter().map(|(i, _)| *i).collect();
    // The earliest start time of the shards.
    prov.time = parts
        .iter()
        .map(|(_, r)| r.provenance.time.clone())
        .min()
        .unwrap_or_default();
    let target = first.summary.target;
    Ok(Report::new(
        prov,
        rows.into_iter().map(|(_, e)| e).collect(),
        target,
    ))
}

/// The current UTC time as RFC 3339 (seconds), from the system clock.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, days-from-civil inverted).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // `date -u -d @951782400` = Tue Feb 29 00:00:00 UTC 2000 (a leap day of a century year).
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        // `date -u -d @1796160719` = Tue Dec  1 21:31:59 UTC 2026.
        assert_eq!(rfc3339(1_796_160_719), "2026-12-01T21:31:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }
}
