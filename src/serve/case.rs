//! A case: a folder of fields under review, and its case folder on disk.
//!
//! ```text
//! <FOLDER>/                      the images, referenced by path and never modified
//! <FOLDER>/.marrow-case/         the case folder (or --case DIR)
//!     model-output.json          what the model said: a count report (the counting API's Report)
//!     audit.jsonl                every reviewer change, append-only, fsynced (see audit.rs)
//!     uploads/                   images dropped onto the page
//!     exports/                   the corrected report and labels, written on request
//! ```
//!
//! The reviewed state is never stored as such: it is the model output with the audit log
//! replayed over it ([`Case::open`]), so the log is the one record of what the reviewer did and
//! a restart (or a crash) rebuilds exactly what was acknowledged. Counts are always re-derived
//! from the cells by the counting library ([`crate::count::tally`]).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::audit::{self, AuditLog, CellSnapshot, Event};
use crate::count::document::{
    self, CellChange, CellState, ImageEntry, Provenance, Report, Review, ReviewedReport,
};
use crate::count::{self, batch, report, Cell, ImageCount, ModelInfo, Summary};
use crate::error::{Error, Result};

pub const MODEL_OUTPUT: &str = "model-output.json";
pub const AUDIT_LOG: &str = "audit.jsonl";
pub const UPLOADS: &str = "uploads";
pub const EXPORTS: &str = "exports";
/// The default case folder inside an image folder (hidden, so `marrow count` skips it).
pub const DEFAULT_CASE_DIR: &str = ".marrow-case";

/// Where an image is in the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", content = "error", rename_all = "snake_case")]
pub enum Status {
    Queued,
    Counting,
    Done,
    Failed(String),
}

/// A cell under review.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewCell {
    /// `d<n>`: the model's n-th detection (by descending score); `a<n>`: drawn by a reviewer.
    pub id: String,
    /// The model's confidence (none for drawn cells).
    pub score: Option<f32>,
    /// The model's state of this cell (none for drawn cells).
    pub model: Option<CellSnapshot>,
    pub state: CellSnapshot,
}

pub struct CaseImage {
    /// Path relative to the case's image folder (`/`-separated), or `uploads/<name>`: the image's
    /// name in the audit log, the reports and the exports.
    pub key: String,
    pub path: PathBuf,
    pub status: Status,
    /// The model's output for this image (once counted).
    pub model: Option<ImageCount>,
    pub cells: Vec<ReviewCell>,
    /// Cell events read from the log before the model output existed (a deleted
    /// model-output.json: the image is recounted and they are applied then).
    pending: Vec<Event>,
    next_added: usize,
}

impl CaseImage {
    fn new(key: String, path: PathBuf) -> Self {
        CaseImage {
            key,
            path,
            status: Status::Queued,
            model: None,
            cells: Vec::new(),
            pending: Vec::new(),
            next_added: 1,
        }
    }

    /// Cells whose state differs from the model's (drawn cells always do, unless deleted).
    pub fn changed(&self) -> usize {
        self.cells
            .iter()
            .filter(|c| match &c.model {
                Some(m) => m != &c.state,
                None => !c.state.deleted,
            })
            .count()
    }
}

/// A case open for review.
pub struct Case {
    pub name: String,
    /// The canonical image folder (none for a case of uploads only).
    pub root: Option<PathBuf>,
    pub dir: PathBuf,
    pub images: Vec<CaseImage>,
    /// Files found in the folder and refused (links that lead outside it), with why.
    pub refused: Vec<String>,
    pub model: ModelInfo,
    pub threshold: f32,
    pub provenance: Option<Provenance>,
    pub signoff: Option<(String, String)>,
    pub reviewers: Vec<String>,
    /// Start-up notes for the page (a torn log line that was cut off).
    pub notes: Vec<String>,
    log: AuditLog,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `a/b/c.png` relative to `root`, with `/` separators on every platform.
fn key_of(path: &Path, root: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Whether `path`, with every link resolved, is inside `dir` (both canonical or resolvable).
pub fn inside(path: &Path, dir: &Path) -> bool {
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// An upload's original name made safe as a file name: its last path component, characters
/// other than letters, digits, `.`, `-` and `_` replaced, never hidden, at most 80 characters.
pub fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut s: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('.') {
        s.remove(0);
    }
    if s.chars().count() > 80 {
        s = s
            .chars()
            .rev()
            .take(80)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
    }
    if s.is_empty() {
        "upload".into()
    } else {
        s
    }
}

/// A cell edit as the page sends it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct EditRequest {
    /// `reclassify` (with `label`), `accept`, `delete`, `restore`, `add` (with `bbox` and
    /// `label`), `undo` / `redo` (with `to`: the state to return the cell to).
    pub op: String,
    #[serde(default)]
    pub cell: Option<String>,
    #[serde(default)]
    pub label: Option<usize>,
    #[serde(default)]
    pub bbox: Option<[f32; 4]>,
    #[serde(default)]
    pub to: Option<CellSnapshot>,
    /// The state the page believes the cell is in; a mismatch (another tab changed it) is a
    /// conflict, not a silent overwrite.
    #[serde(default)]
    pub expect: Option<CellSnapshot>,
    #[serde(default)]
    pub reviewer: String,
}

/// Why an edit was refused; the server maps these to 4xx answers.
#[derive(Debug)]
pub enum EditError {
    Bad(String),
    NotFound(String),
    Conflict(String),
    Io(Error),
}

impl Case {
    /// Opens (creating if needed) the case folder `dir` for the images of `root` (none: uploads
    /// only), reads the model output and replays the audit log.
    pub fn open(
        name: String,
        root: Option<&Path>,
        dir: &Path,
        model: &ModelInfo,
        threshold: f32,
    ) -> Result<Case> {
        std::fs::create_dir_all(dir.join(UPLOADS)).map_err(io(dir))?;
        let dir = dir.canonicalize().map_err(io(dir))?;
        let mut images = Vec::new();
        let mut refused = Vec::new();
        let root = match root {
            Some(r) => Some(r.canonicalize().map_err(io(r))?),
            None => None,
        };
        if let Some(root) = &root {
            for p in batch::collect_inputs(std::slice::from_ref(root))? {
                // The case folder may sit inside the image folder; its uploads are listed from the
                // log below, not as folder images (collect_inputs skips hidden folders anyway).
                if p.starts_with(&dir) {
                    continue;
                }
                let key = key_of(&p, root).unwrap_or_else(|| p.display().to_string());
                if !inside(&p, root) {
                    refused.push(format!(
                        "{key}: a link to a file outside {}",
                        root.display()
                    ));
                    continue;
                }
                images.push(CaseImage::new(key, p));
            }
        }
        let (log, replay) = AuditLog::open(&dir.join(AUDIT_LOG))?;
        let mut case = Case {
            name,
            root,
            images,
            refused,
            model: model.clone(),
            threshold,
            provenance: None,
            signoff: None,
            reviewers: Vec::new(),
            notes: Vec::new(),
            log,
            dir: dir.clone(),
        };
        if let Some(n) = replay.torn_bytes {
            case.notes.push(format!(
                "the audit log ended in a torn line ({n} bytes, an edit interrupted by a crash \
                 before it was acknowledged); it was cut off"
            ));
        }
        case.load_model_output()?;
        for e in replay.events {
            case.replay(e)?;
        }
        Ok(case)
    }

    fn load_model_output(&mut self) -> Result<()> {
        let path = self.dir.join(MODEL_OUTPUT);
        if !path.exists() {
            return Ok(());
        }
        let rep = Report::read(&path)?;
        let p = &rep.provenance;
        if p.model.sha256 != self.model.sha256 {
            return Err(Error::Invalid(format!(
                "case {}: it was counted with model {} (sha256 {}…), not with this one ({}, \
                 sha256 {}…): pass the same --weights, or --case NEW_DIR to start a new case",
                self.dir.display(),
                p.model.file,
                &p.model.sha256[..12.min(p.model.sha256.len())],
                self.model.file,
                &self.model.sha256[..12.min(self.model.sha256.len())]
            )));
        }
        if p.threshold != self.threshold {
            return Err(Error::Invalid(format!(
                "case {}: it was counted at threshold {}, not {}: pass --threshold {}",
                self.dir.display(),
                p.threshold,
                self.threshold,
                p.threshold
            )));
        }
        self.provenance = Some(rep.provenance.clone());
        for entry in rep.images {
            // Images of the output that are no longer in the folder are dropped; failures are
            // retried (they may have been transient).
            if let ImageEntry::Counted(ic) = entry {
                if let Some(i) = self.index_of(&ic.file) {
                    self.set_model_cells(i, ic);
                }
            }
        }
        Ok(())
    }

    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.images.iter().position(|im| im.key == key)
    }

    /// Installs the model's output for image `i` and applies events that were waiting for it.
    fn set_model_cells(&mut self, i: usize, ic: ImageCount) {
        let im = &mut self.images[i];
        im.cells = ic
            .detections
            .iter()
            .enumerate()
            .map(|(n, d)| {
                let snap = CellSnapshot {
                    bbox: d.bbox,
                    label: d.label,
                    class: d.class.clone(),
                    counted: d.counted,
                    deleted: false,
                };
                ReviewCell {
                    id: format!("d{n}"),
                    score: Some(d.score),
                    model: Some(snap.clone()),
                    state: snap,
                }
            })
            .collect();
        im.model = Some(ic);
        im.status = Status::Done;
        for e in std::mem::take(&mut im.pending) {
            apply_cell_event(im, &e);
        }
    }

    /// Applies one logged event to the state.
    fn replay(&mut self, e: Event) -> Result<()> {
        match e.op.as_str() {
            "upload" => {
                let key = e.image.clone().unwrap_or_default();
                let path = self.dir.join(&key);
                if self.index_of(&key).is_none() && path.is_file() {
                    self.images.push(CaseImage::new(key.clone(), path));
                    // Uploads counted before the restart are in the model output.
                    self.load_one_output(&key)?;
                }
            }
            "signoff" => self.signoff = Some((e.reviewer.clone(), e.time.clone())),
            "reopen" => self.signoff = None,
            _ => {
                if !self.reviewers.contains(&e.reviewer) {
                    self.reviewers.push(e.reviewer.clone());
                }
                let Some(i) = e.image.as_deref().and_then(|k| self.index_of(k)) else {
                    // An event for an image no longer in the folder: nothing to apply it to.
                    return Ok(());
                };
                let im = &mut self.images[i];
                if im.model.is_some() {
                    apply_cell_event(im, &e);
                } else {
                    im.pending.push(e);
                }
            }
        }
        Ok(())
    }

    fn load_one_output(&mut self, key: &str) -> Result<()> {
        let path = self.dir.join(MODEL_OUTPUT);
        if !path.exists() {
            return Ok(());
        }
        let rep = Report::read(&path)?;
        for entry in rep.images {
            if let ImageEntry::Counted(ic) = entry {
                if ic.file == key {
                    if let Some(i) = self.index_of(key) {
                        self.set_model_cells(i, ic);
                    }
                }
            }
        }
        Ok(())
    }

    /// Images still waiting for the model.
    pub fn uncounted(&self) -> Vec<usize> {
        (0..self.images.len())
            .filter(|&i| self.images[i].model.is_none())
            .collect()
    }

    /// The worker's result for image `i`: kept in memory and written to `model-output.json`
    /// (atomically) before the image becomes reviewable.
    pub fn set_model_output(
        &mut self,
        i: usize,
        result: std::result::Result<ImageCount, String>,
        provenance: &Provenance,
    ) -> Result<()> {
        if self.provenance.is_none() {
            self.provenance = Some(provenance.clone());
        }
        let result = match &self.provenance {
            // The case's detections (and so its cell ids) came from one configuration; a field
            // counted another way would not belong to it.
            Some(p) if p.refinement_head != provenance.refinement_head => Err(format!(
                "this case was counted {} the refinement head; restart marrow serve {}",
                if p.refinement_head { "with" } else { "without" },
                if p.refinement_head {
                    "without --no-refine"
                } else {
                    "with --no-refine"
                }
            )),
            _ => result,
        };
        match result {
            Ok(ic) => self.set_model_cells(i, ic),
            Err(msg) => self.images[i].status = Status::Failed(msg),
        }
        self.write_model_output()
    }

    fn write_model_output(&self) -> Result<()> {
        let Some(prov) = &self.provenance else {
            return Ok(());
        };
        let entries: Vec<ImageEntry> = self
            .images
            .iter()
            .filter_map(|im| match (&im.model, &im.status) {
                (Some(ic), _) => Some(ImageEntry::Counted(ic.clone())),
                (None, Status::Failed(e)) => Some(ImageEntry::Failed {
                    file: im.key.clone(),
                    error: e.clone(),
                }),
                _ => None,
            })
            .collect();
        let mut prov = prov.clone();
        prov.inputs_total = entries.len();
        prov.input_indices = (0..entries.len()).collect();
        let rep = Report::new(prov, entries, None);
        // Rewritten whole after every field (atomically): compact, to keep that cheap.
        let text = serde_json::to_string(&rep)
            .map_err(|e| Error::Invalid(format!("cannot serialise the model output: {e}")))?;
        audit::write_atomic(&self.dir.join(MODEL_OUTPUT), text.as_bytes())
    }

    pub fn set_status(&mut self, i: usize, s: Status) {
        if let Some(im) = self.images.get_mut(i) {
            if im.model.is_none() {
                im.status = s;
            }
        }
    }

    /// Adds an uploaded image (already saved under `uploads/`, name `file_name`), logged before
    /// it is acknowledged. Returns its index.
    pub fn add_upload(
        &mut self,
        file_name: &str,
        original: &str,
        sha256: &str,
        reviewer: &str,
    ) -> Result<usize> {
        let key = format!("{UPLOADS}/{file_name}");
        self.log.append(Event {
            seq: 0,
            time: document::now_rfc3339(),
            reviewer: reviewer.to_string(),
            op: "upload".into(),
            image: Some(key.clone()),
            cell: None,
            before: None,
            after: None,
            detail: Some(json!({"original_name": original, "sha256": sha256})),
        })?;
        let path = self.dir.join(&key);
        self.images.push(CaseImage::new(key, path));
        Ok(self.images.len() - 1)
    }

    /// Signs the case off (`reviewer` set) or reopens it (`None`).
    pub fn sign(&mut self, reviewer: Option<&str>) -> std::result::Result<(), EditError> {
        let (op, who) = match reviewer {
            Some(r) => ("signoff", r),
            None => ("reopen", "-"),
        };
        if reviewer.is_some() && self.images.iter().any(|im| im.model.is_none()) {
            let waiting = self.uncounted().len();
            return Err(EditError::Conflict(format!(
                "{waiting} image(s) are not counted yet: sign off when the queue is done"
            )));
        }
        let e = self
            .log
            .append(Event {
                seq: 0,
                time: document::now_rfc3339(),
                reviewer: who.to_string(),
                op: op.into(),
                image: None,
                cell: None,
                before: None,
                after: None,
                detail: None,
            })
            .map_err(EditError::Io)?;
        self.signoff = reviewer.map(|r| (r.to_string(), e.time));
        Ok(())
    }

    /// Validates an edit of image `i`, logs it durably, then applies it. Returns the cell id.
    pub fn edit(&mut self, i: usize, req: &EditRequest) -> std::result::Result<String, EditError> {
        let reviewer = req.reviewer.trim();
        if reviewer.is_empty() || reviewer.len() > 200 {
            return Err(EditError::Bad(
                "enter your name first: every change is logged with the reviewer's name".into(),
            ));
        }
        if self.signoff.is_some() {
            return Err(EditError::Conflict(
                "the case is signed off: reopen it to make changes".into(),
            ));
        }
        let classes = self.model.classes.len();
        let im = self
            .images
            .get(i)
            .ok_or_else(|| EditError::NotFound(format!("no image {i} in this case")))?;
        let Some(ic) = &im.model else {
            return Err(EditError::Conflict(
                "this image is not counted yet: wait for the model".into(),
            ));
        };
        let (w, h) = (ic.width as f32, ic.height as f32);
        let check_label = |l: usize| {
            if (1..=classes).contains(&l) {
                Ok(l)
            } else {
                Err(EditError::Bad(format!(
                    "label {l} is not a class of this model (1–{classes})"
                )))
            }
        };
        let (cell_id, before, after) = if req.op == "add" {
            let label = check_label(req.label.unwrap_or(0))?;
            let b = req
                .bbox
                .ok_or_else(|| EditError::Bad("add: a bbox [x1, y1, x2, y2] is needed".into()))?;
            let b = [b[0].max(0.0), b[1].max(0.0), b[2].min(w), b[3].min(h)];
            if !b.iter().all(|v| v.is_finite()) || b[2] - b[0] < 2.0 || b[3] - b[1] < 2.0 {
                return Err(EditError::Bad(format!(
                    "add: {:?} is not a box inside the {w}×{h} image (at least 2 px a side)",
                    req.bbox
                )));
            }
            let id = format!("a{}", im.next_added);
            let after = CellSnapshot {
                bbox: b,
                label,
                class: self.model.class_name(label),
                counted: true,
                deleted: false,
            };
            (id, None, after)
        } else {
            let id = req
                .cell
                .clone()
                .ok_or_else(|| EditError::Bad(format!("{}: which cell?", req.op)))?;
            let cell = im
                .cells
                .iter()
                .find(|c| c.id == id)
                .ok_or_else(|| EditError::NotFound(format!("no cell {id} in {}", im.key)))?;
            let cur = cell.state.clone();
            if let Some(exp) = &req.expect {
                if exp != &cur {
                    return Err(EditError::Conflict(format!(
                        "cell {id} was changed elsewhere (another tab?): reload the image"
                    )));
                }
            }
            let mut after = cur.clone();
            match req.op.as_str() {
                "reclassify" => {
                    let label = check_label(req.label.unwrap_or(0))?;
                    after.label = label;
                    after.class = self.model.class_name(label);
                    after.counted = true;
                    after.deleted = false;
                }
                "accept" => {
                    after.counted = true;
                    after.deleted = false;
                }
                "delete" => {
                    after.deleted = true;
                    after.counted = false;
                }
                "restore" => {
                    after.deleted = false;
                    after.counted = true;
                }
                "undo" | "redo" => {
                    let to = req.to.clone().ok_or_else(|| {
                        EditError::Bad(format!("{}: the state to return to is needed", req.op))
                    })?;
                    check_label(to.label)?;
                    if to.bbox != cur.bbox {
                        return Err(EditError::Bad(format!(
                            "{}: a cell's box does not move",
                            req.op
                        )));
                    }
                    after = to;
                    after.class = self.model.class_name(after.label);
                    if after.deleted {
                        after.counted = false;
                    }
                }
                op => return Err(EditError::Bad(format!("unknown edit {op:?}"))),
            }
            (id, Some(cur), after)
        };
        if before.as_ref() == Some(&after) {
            return Ok(cell_id);
        }
        let event = Event {
            seq: 0,
            time: document::now_rfc3339(),
            reviewer: reviewer.to_string(),
            op: req.op.clone(),
            image: Some(im.key.clone()),
            cell: Some(cell_id.clone()),
            before,
            after: Some(after),
            detail: None,
        };
        // Durable first, then applied: what the page is told happened is on disk.
        let event = self.log.append(event).map_err(EditError::Io)?;
        if !self.reviewers.contains(&event.reviewer) {
            self.reviewers.push(event.reviewer.clone());
        }
        apply_cell_event(&mut self.images[i], &event);
        Ok(cell_id)
    }

    /// Image `i` as the reviewer left it, counted by the library: deleted cells dropped, drawn
    /// cells with score 1.0 (they have no model score; `review.changes` marks them).
    pub fn reviewed_count(&self, i: usize) -> Option<ImageCount> {
        let im = self.images.get(i)?;
        let ic = im.model.as_ref()?;
        let cells: Vec<Cell> = im
            .cells
            .iter()
            .filter(|c| !c.state.deleted)
            .map(|c| Cell {
                bbox: c.state.bbox,
                class: c.state.class.clone(),
                label: c.state.label,
                score: c.score.unwrap_or(1.0),
                counted: c.state.counted,
            })
            .collect();
        Some(count::tally(
            &self.model,
            &im.key,
            ic.width,
            ic.height,
            cells,
            ic.tiles.clone(),
        ))
    }

    /// Totals over the counted images, reviewed (`reviewed`) or as the model said.
    pub fn summary(&self, reviewed: bool, target: Option<usize>) -> Summary {
        let counts: Vec<ImageCount> = (0..self.images.len())
            .filter_map(|i| {
                if reviewed {
                    self.reviewed_count(i)
                } else {
                    self.images[i].model.clone()
                }
            })
            .collect();
        Summary::of(&self.model, counts.iter().map(Ok), target)
    }

    pub fn audit_events(&self) -> usize {
        self.log.len()
    }

    /// The corrected report with its review section (what the JSON and CSV exports hold).
    pub fn reviewed_report(&self, target: Option<usize>) -> Result<ReviewedReport> {
        let prov = self.provenance.clone().ok_or_else(|| {
            Error::Invalid("nothing to export yet: no image has been counted".into())
        })?;
        let mut entries = Vec::new();
        let mut changes = Vec::new();
        for (i, im) in self.images.iter().enumerate() {
            match (self.reviewed_count(i), &im.status) {
                (Some(ic), _) => entries.push(ImageEntry::Counted(ic)),
                (None, Status::Failed(e)) => entries.push(ImageEntry::Failed {
                    file: im.key.clone(),
                    error: e.clone(),
                }),
                (None, _) => entries.push(ImageEntry::Failed {
                    file: im.key.clone(),
                    error: "not counted yet when the report was exported".into(),
                }),
            }
            for c in &im.cells {
                let state = |s: &CellSnapshot, score| CellState {
                    class: s.class.clone(),
                    label: s.label,
                    counted: s.counted && !s.deleted,
                    bbox: s.bbox,
                    score,
                };
                let change = match &c.model {
                    None if c.state.deleted => continue,
                    None => "added",
                    Some(m) if m == &c.state => continue,
                    Some(_) if c.state.deleted => "deleted",
                    Some(m) if m.label != c.state.label => "reclassified",
                    Some(_) if c.state.counted => "confirmed",
                    Some(_) => "uncounted",
                };
                changes.push(CellChange {
                    image: im.key.clone(),
                    cell: c.id.clone(),
                    change: change.into(),
                    model: c.model.as_ref().map(|m| state(m, c.score)),
                    reviewed: (!c.state.deleted).then(|| state(&c.state, c.score)),
                });
            }
        }
        let mut prov = prov;
        prov.inputs_total = entries.len();
        prov.input_indices = (0..entries.len()).collect();
        let report = Report::new(prov, entries, target);
        let review = Review {
            case: self.name.clone(),
            case_dir: self.dir.display().to_string(),
            status: if self.signoff.is_some() {
                "signed off".into()
            } else {
                "in review".into()
            },
            signed_off_by: self.signoff.as_ref().map(|s| s.0.clone()),
            signed_off_at: self.signoff.as_ref().map(|s| s.1.clone()),
            reviewers: self.reviewers.clone(),
            exported_at: document::now_rfc3339(),
            audit_log: AUDIT_LOG.into(),
            audit_events: self.log.len(),
            model_summary: self.summary(false, target),
            changes,
        };
        Ok(ReviewedReport { report, review })
    }

    /// Writes an export into `exports/`; returns the files written (relative to the case
    /// folder). `json`: the reviewed report; `csv`: its table; `coco` and `yolo`: the corrected
    /// cells as training labels, next to copies of the images they label.
    pub fn export(&self, format: &str, target: Option<usize>) -> Result<Vec<String>> {
        let rr = self.reviewed_report(target)?;
        let out = self.dir.join(EXPORTS);
        std::fs::create_dir_all(&out).map_err(io(&out))?;
        let rel = |p: &Path| {
            p.strip_prefix(&self.dir)
                .map(|r| r.display().to_string())
                .unwrap_or_else(|_| p.display().to_string())
        };
        let mut written = Vec::new();
        match format {
            "json" => {
                let p = out.join("reviewed-report.json");
                let text = serde_json::to_string_pretty(&rr)
                    .map_err(|e| Error::Invalid(format!("cannot serialise the report: {e}")))?;
                audit::write_atomic(&p, (text + "\n").as_bytes())?;
                written.push(rel(&p));
            }
            "csv" => {
                let p = out.join("reviewed-report.csv");
                audit::write_atomic(&p, report::csv_text(&rr.report).as_bytes())?;
                written.push(rel(&p));
            }
            "coco" | "yolo" => {
                // Both formats label copies of the images under yolo/images/reviewed/, so that
                // `train.py --data exports/yolo --train-split reviewed` and
                // `train.py --coco-train exports/coco-ground-truth.json` (image root = the JSON's
                // folder) both find them.
                let yolo = out.join("yolo");
                let img_dir = yolo.join("images").join("reviewed");
                let lab_dir = yolo.join("labels").join("reviewed");
                for d in [&img_dir, &lab_dir] {
                    std::fs::create_dir_all(d).map_err(io(d))?;
                }
                let stems = report::output_stems(self.images.iter().map(|im| im.key.as_str()));
                let mut coco_report = rr.report.clone();
                coco_report.images.clear();
                for ((im, stem), entry) in self.images.iter().zip(&stems).zip(&rr.report.images) {
                    let Some(ic) = entry.counted() else { continue };
                    let ext = im
                        .path
                        .extension()
                        .map(|e| e.to_string_lossy().to_lowercase())
                        .unwrap_or_else(|| "png".into());
                    let copy = img_dir.join(format!("{stem}.{ext}"));
                    let same = std::fs::metadata(&copy)
                        .ok()
                        .zip(std::fs::metadata(&im.path).ok())
                        .is_some_and(|(a, b)| a.len() == b.len());
                    if !same {
                        std::fs::copy(&im.path, &copy).map_err(io(&copy))?;
                    }
                    if format == "yolo" {
                        let p = lab_dir.join(format!("{stem}.txt"));
                        audit::write_atomic(&p, report::yolo_label_text(ic).as_bytes())?;
                        written.push(rel(&p));
                    }
                    let mut ic = ic.clone();
                    ic.file = format!("yolo/images/reviewed/{stem}.{ext}");
                    coco_report.images.push(ImageEntry::Counted(ic));
                }
                if format == "yolo" {
                    let p = yolo.join(crate::eval::labels::CLASSES_TXT);
                    let text: String = self
                        .model
                        .classes
                        .iter()
                        .map(|c| format!("{c}\n"))
                        .collect();
                    audit::write_atomic(&p, text.as_bytes())?;
                    written.insert(0, rel(&p));
                } else {
                    let p = out.join("coco-ground-truth.json");
                    let text = report::coco_ground_truth(&coco_report).to_string();
                    audit::write_atomic(&p, text.as_bytes())?;
                    written.push(rel(&p));
                }
            }
            f => {
                return Err(Error::Invalid(format!(
                    "unknown export format {f:?} (json, csv, coco, yolo)"
                )))
            }
        }
        Ok(written)
    }

    /// The page's view of image `i`: its cells and its reviewed counts.
    pub fn image_view(&self, i: usize) -> Option<Value> {
        let im = self.images.get(i)?;
        let near = crate::count::annotate::NEAR_FRACTION * self.threshold;
        let cells: Vec<Value> = im
            .cells
            .iter()
            .filter(|c| c.score.is_none_or(|s| s >= near) || c.model != Some(c.state.clone()))
            .map(|c| {
                let changed = match &c.model {
                    Some(m) => m != &c.state,
                    None => true,
                };
                json!({
                    "id": c.id,
                    "bbox": c.state.bbox,
                    "label": c.state.label,
                    "class": c.state.class,
                    "counted": c.state.counted,
                    "deleted": c.state.deleted,
                    "score": c.score,
                    "changed": changed,
                    "model": c.model,
                    "state": c.state,
                })
            })
            .collect();
        let count = self.reviewed_count(i);
        Some(json!({
            "index": i,
            "key": im.key,
            "width": im.model.as_ref().map(|m| m.width),
            "height": im.model.as_ref().map(|m| m.height),
            "status": im.status,
            "cells": cells,
            "hidden_low_scores": im.cells.len() - cells.len(),
            "count": count.map(|c| json!({
                "counts": c.counts, "total": c.total,
                "differential": c.differential, "me_ratio": c.me_ratio,
            })),
        }))
    }

    /// The page's view of the case: its images and the running tally.
    pub fn case_view(&self, id: usize, target: Option<usize>) -> Value {
        let images: Vec<Value> = self
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| {
                json!({
                    "index": i,
                    "key": im.key,
                    "status": im.status,
                    "total": self.reviewed_count(i).map(|c| c.total),
                    "changed": im.changed(),
                })
            })
            .collect();
        json!({
            "id": id,
            "name": self.name,
            "case_dir": self.dir.display().to_string(),
            "images": images,
            "refused": self.refused,
            "notes": self.notes,
            "summary": self.summary(true, target),
            "model_summary": self.summary(false, target),
            "signoff": self.signoff.as_ref().map(|(r, t)| json!({"reviewer": r, "time": t})),
            "reviewers": self.reviewers,
            "audit_events": self.log.len(),
        })
    }
}

/// Sets the cell of a logged event to its `after` state, creating a drawn cell.
fn apply_cell_event(im: &mut CaseImage, e: &Event) {
    let (Some(id), Some(after)) = (&e.cell, &e.after) else {
        return;
    };
    match im.cells.iter_mut().find(|c| &c.id == id) {
        Some(c) => c.state = after.clone(),
        None if id.starts_with('a') => {
            im.cells.push(ReviewCell {
                id: id.clone(),
                score: None,
                model: None,
                state: after.clone(),
            });
        }
        None => {}
    }
    if let Some(n) = id.strip_prefix('a').and_then(|n| n.parse::<usize>().ok()) {
        im.next_added = im.next_added.max(n + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_names_are_made_safe() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("C:\\x\\field 1.png"), "field_1.png");
        assert_eq!(safe_file_name(".hidden.jpg"), "hidden.jpg");
        assert_eq!(safe_file_name(""), "upload");
        assert_eq!(safe_file_name(".."), "upload");
        assert!(safe_file_name(&"a".repeat(500)).len() <= 80);
    }
}
