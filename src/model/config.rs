//! The model's configuration, carried in the safetensors `__metadata__` under the key
//! [`CONFIG_KEY`] as one JSON object. Every field has torchvision's default, so a file without
//! metadata (or with a partial object) describes `fasterrcnn_resnet50_fpn` as torchvision builds it.
//! Architecture facts that the tensors themselves determine (ResNet depth, FPN width, class count,
//! representation size) are inferred from the weights and checked against this config.

use serde::{Deserialize, Serialize};

use crate::ops::rpn::MAX_ANCHORS_PER_LOCATION;

/// Feature-pyramid levels the detector has (P2..P5 and the max-pool P6): one anchor size each.
pub const FPN_LEVELS: usize = 5;

/// The metadata key that holds the JSON config.
pub const CONFIG_KEY: &str = "marrow.config";

/// Current version of the config schema. Files with a larger version are refused.
pub const CONFIG_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub format_version: u32,
    /// "resnet18" | "resnet34" | "resnet50" | "resnet101"; `None` means "infer from the tensors".
    pub backbone: Option<String>,
    /// Class names, index 0 = background. `None` means "class_0, class_1, …" from the tensor shapes.
    pub class_names: Option<Vec<String>>,
    pub transform: TransformConfig,
    /// FrozenBatchNorm2d eps: 0.0 for torchvision's pretrained builder (`overwrite_eps`), 1e-5 for
    /// a plain `load_state_dict` or a BatchNorm2d export.
    pub frozen_bn_eps: f32,
    pub rpn: RpnConfig,
    pub box_head: BoxConfig,
    /// Refinement-head settings (docs/design.md §6); absent when the file has no `refine.*`
    /// tensors.
    pub refine: Option<serde_json::Value>,
    /// The side (native pixels) of a square field that the transform scales as it scaled a
    /// typical training image: the median short side of the training images, which the transform
    /// maps to `min_size`. `marrow count --tile auto` cuts images larger than 1.5× this into
    /// fields of this size, so cells appear at the training scale; `None` = unknown (no cutting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<u32>,
    /// Optional lineage of each class, by class name: `"myeloid"` or `"erythroid"` (other values
    /// are allowed and ignored). Used for the M:E ratio; absent = no ratio is reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lineage: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformConfig {
    pub min_size: u32,
    pub max_size: u32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub size_divisible: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpnConfig {
    pub pre_nms_top_n: u32,
    pub post_nms_top_n: u32,
    pub nms_thresh: f32,
    pub score_thresh: f32,
    pub min_size: f32,
    /// torchvision `AnchorGenerator` sizes: one size per FPN level (P2..P6, in input pixels of the
    /// resized image). The weights cannot tell these: a checkpoint trained with other anchors
    /// runs with wrong boxes unless its config says so.
    pub anchor_sizes: Vec<f32>,
    /// `AnchorGenerator` aspect ratios (h / w), the same for every level. Their count must equal
    /// the RPN head's outputs per location (`rpn.head.cls_logits.weight` rows).
    pub aspect_ratios: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoxConfig {
    pub score_thresh: f32,
    pub nms_thresh: f32,
    pub detections_per_img: u32,
    pub min_size: f32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            format_version: CONFIG_FORMAT_VERSION,
            backbone: None,
            class_names: None,
            transform: TransformConfig::default(),
            frozen_bn_eps: 0.0,
            rpn: RpnConfig::default(),
            box_head: BoxConfig::default(),
            refine: None,
            field: None,
            lineage: None,
        }
    }
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            min_size: 800,
            max_size: 1333,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            size_divisible: 32,
        }
    }
}

impl Default for RpnConfig {
    fn default() -> Self {
        Self {
            pre_nms_top_n: 1000,
            post_nms_top_n: 1000,
            nms_thresh: 0.7,
            score_thresh: 0.0,
            min_size: 1e-3,
            anchor_sizes: crate::cpu::rpn::DEFAULT_SIZES.to_vec(),
            aspect_ratios: crate::cpu::rpn::DEFAULT_RATIOS.to_vec(),
        }
    }
}

impl Default for BoxConfig {
    fn default() -> Self {
        Self {
            score_thresh: 0.05,
            nms_thresh: 0.5,
            detections_per_img: 100,
            min_size: 1e-2,
        }
    }
}

impl ModelConfig {
    /// Parses the JSON text found under [`CONFIG_KEY`]; `Err` carries serde's message (which names
    /// the offending field).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let cfg: ModelConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Range checks that serde cannot express. Values outside these make no sense for the model
    /// and would otherwise surface as NaNs or absurd allocations much later.
    pub fn check(&self) -> Result<(), String> {
        if self.format_version > CONFIG_FORMAT_VERSION {
            return Err(format!(
                "format_version {} is newer than this marrow understands ({})",
                self.format_version, CONFIG_FORMAT_VERSION
            ));
        }
        let t = &self.transform;
        if t.min_size == 0 || t.max_size == 0 || t.min_size > 8192 || t.max_size > 8192 {
            return Err(format!(
                "transform.min_size {} / max_size {} must be in 1..=8192",
                t.min_size, t.max_size
            ));
        }
        if t.size_divisible == 0 || t.size_divisible > 256 {
            return Err(format!(
                "transform.size_divisible {} must be in 1..=256",
                t.size_divisible
            ));
        }
        if t.image_std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || t.image_mean.iter().any(|m| !m.is_finite())
        {
            return Err("transform.image_mean/image_std must be finite, std > 0".into());
        }
        if !self.frozen_bn_eps.is_finite() || self.frozen_bn_eps < 0.0 {
            return Err(format!("frozen_bn_eps {} must be ≥ 0", self.frozen_bn_eps));
        }
        let r = &self.rpn;
        // One size per level: marrow's FPN always has five levels (P2..P5 + the max-pool P6).
        // torchvision also allows several sizes per level; those files are refused here rather
        // than run with half their anchors.
        if r.anchor_sizes.len() != FPN_LEVELS {
            return Err(format!(
                "rpn.anchor_sizes has {} entries; marrow's FPN has {FPN_LEVELS} levels and takes \
                 one anchor size per level",
                r.anchor_sizes.len()
            ));
        }
        if let Some(s) = r
            .anchor_sizes
            .iter()
            .find(|s| !s.is_finite() || **s < 1.0 || **s > 8192.0)
        {
            return Err(format!(
                "rpn.anchor_sizes: {s} is not a size in 1..=8192 pixels"
            ));
        }
        if r.aspect_ratios.is_empty() || r.aspect_ratios.len() > MAX_ANCHORS_PER_LOCATION {
            return Err(format!(
                "rpn.aspect_ratios has {} entries; marrow takes 1..={MAX_ANCHORS_PER_LOCATION}",
                r.aspect_ratios.len()
            ));
        }
        if let Some(a) = r
            .aspect_ratios
            .iter()
            .find(|a| !a.is_finite() || **a < 1.0 / 64.0 || **a > 64.0)
        {
            return Err(format!(
                "rpn.aspect_ratios: {a} is not a ratio (h / w) in 1/64..=64"
            ));
        }
        if let Some(f) = self.field {
            if !(32..=65536).contains(&f) {
                return Err(format!("field {f} must be in 32..=65536 pixels"));
            }
        }
        if let (Some(lineage), Some(names)) = (&self.lineage, &self.class_names) {
            if let Some(unknown) = lineage.keys().find(|k| !names.contains(k)) {
                return Err(format!(
                    "lineage names class {unknown:?}, which is not in class_names {names:?}"
                ));
            }
        }
        if let Some(b) = &self.backbone {
            if !["resnet18", "resnet34", "resnet50", "resnet101"].contains(&b.as_str()) {
                return Err(format!(
                    "backbone {b:?} is not one of resnet18, resnet34, resnet50, resnet101"
                ));
            }
        }
        Ok(())
    }
}
