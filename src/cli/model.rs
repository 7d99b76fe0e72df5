//! `marrow model`: what a model file is, without a GPU.

use std::path::Path;
use std::process::ExitCode;

use marrow::count::{Model, ModelDescription};

/// Prints the description of `--weights` (else MARROW_WEIGHTS, else the built-in model).
pub fn run_model(weights: Option<&Path>, json: bool) -> marrow::Result<ExitCode> {
    let d = Model::resolve(weights)?.describe()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&d).map_err(|e| marrow::Error::Invalid(e.to_string()))?
        );
    } else {
        print!("{}", text(&d));
    }
    Ok(ExitCode::SUCCESS)
}

fn list(v: &[f32]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The human-readable form: one line per topic, the settings that change counts first.
pub fn text(d: &ModelDescription) -> String {
    let c = &d.config;
    let t = &c.transform;
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<15} {v}\n"));
    line("model", d.info.file.clone());
    line("sha256", d.info.sha256.clone());
    line("classes", d.info.classes.join(", "));
    line(
        "architecture",
        format!(
            "Faster R-CNN, {} + FPN {}, box head {}; {} tensors, {:.1} M parameters",
            d.backbone,
            d.fpn_width,
            d.representation_size,
            d.tensors,
            d.parameters as f64 / 1e6
        ),
    );
    line(
        "transform",
        format!(
            "short side {} (long side ≤ {}), mean {:?}, std {:?}, padded to {}",
            t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible
        ),
    );
    line(
        "anchors",
        format!(
            "sizes {} (P2..P6), aspect ratios {} ({} per location)",
            list(&c.rpn.anchor_sizes),
            list(&c.rpn.aspect_ratios),
            d.anchors_per_location
        ),
    );
    line(
        "rpn",
        format!(
            "top {} per level, NMS {}, keep {}",
            c.rpn.pre_nms_top_n, c.rpn.nms_thresh, c.rpn.post_nms_top_n
        ),
    );
    line(
        "box head",
        format!(
            "score ≥ {}, NMS {} per class, ≤ {} detections",
            c.box_head.score_thresh, c.box_head.nms_thresh, c.box_head.detections_per_img
        ),
    );
    line(
        "field",
        match c.field {
            Some(f) => format!("{f} px (count --tile auto cuts larger images into such fields)"),
            None => "unknown (no automatic tiling)".into(),
        },
    );
    line(
        "refinement",
        match &c.refine {
            Some(r) => r.to_string(),
            None => "none".into(),
        },
    );
    line(
        "lineage",
        match &c.lineage {
            Some(l) => l
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
            None => "none (no M:E ratio)".into(),
        },
    );
    line("BN eps", c.frozen_bn_eps.to_string());
    s
}
