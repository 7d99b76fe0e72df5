//! The detection heads' learned layers: the RPN head (shared 3×3 conv + ReLU, objectness and box
//! 1×1 convs over all five levels) and the box head MLP (TwoMLPHead fc6/fc7 + FastRCNNPredictor),
//! all as convolutions on the one conv kernel. Shapes are read from the weights.

use std::sync::Arc;

use super::graph::{Graph, ValueId};
use super::weights::WeightStore;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::box_head::linear;
use crate::ops::conv::{Conv2d, ConvWeights, Residual};

/// RPN head weights, uploaded once and shared by the five levels.
pub struct RpnHead {
    pub channels: usize,
    pub anchors: usize,
    conv: (Conv2d, Arc<ConvWeights>),
    cls: (Conv2d, Arc<ConvWeights>),
    bbox: (Conv2d, Arc<ConvWeights>),
}

fn conv_k(cin: usize, cout: usize, k: usize, relu: bool) -> Conv2d {
    Conv2d {
        cin,
        cout,
        kh: k,
        kw: k,
        stride: 1,
        pad: (k - 1) / 2,
        relu,
        residual: Residual::None,
    }
}

fn werr(ws: &WeightStore, m: String) -> Error {
    Error::Weights {
        path: ws.source.clone(),
        message: m,
    }
}

impl RpnHead {
    pub fn load(gpu: &Gpu, ws: &WeightStore, channels: usize) -> Result<RpnHead> {
        let a = ws
            .shape("rpn.head.cls_logits.weight")
            .map(|s| s[0])
            .ok_or_else(|| werr(ws, "tensor rpn.head.cls_logits.weight is missing".into()))?;
        // The head predicts one objectness per anchor; the anchors come from the config. A
        // mismatch would pair logits with the wrong anchors, so it is refused, naming both.
        let ratios = &ws.config.rpn.aspect_ratios;
        if a != ratios.len() {
            return Err(werr(
                ws,
                format!(
                    "rpn.head.cls_logits.weight has {a} outputs (anchors per location) but the \
                     config's rpn.aspect_ratios {ratios:?} makes {} anchors per location; set \
                     rpn.aspect_ratios to the checkpoint's AnchorGenerator aspect ratios \
                     (weights/convert.py --aspect-ratios)",
                    ratios.len()
                ),
            ));
        }
        let up = |name: &str, op: Conv2d| -> Result<(Conv2d, Arc<ConvWeights>)> {
            let (w, b) = ws.conv_bias(name, [op.cout, op.cin, op.kh, op.kw])?;
            Ok((op, Arc::new(op.upload(gpu, name, &w, &b)?)))
        };
        Ok(RpnHead {
            channels,
            anchors: a,
            conv: up("rpn.head.conv.0.0", conv_k(channels, channels, 3, true))?,
            cls: up("rpn.head.cls_logits", conv_k(channels, a, 1, false))?,
            bbox: up("rpn.head.bbox_pred", conv_k(channels, 4 * a, 1, false))?,
        })
    }

    /// Adds the head over each level; returns (objectness [1,H,W,A], deltas [1,H,W,4A]) per level.
    /// NHWC flattening of these equals torchvision's permute_and_flatten order (h, w, a[, k]).
    pub fn add(&self, g: &mut Graph, levels: &[ValueId]) -> Vec<(ValueId, ValueId)> {
        levels
            .iter()
            .enumerate()
            .map(|(l, &p)| {
                let t = g.conv(
                    &format!("rpn.head.conv[{l}]"),
                    self.conv.0,
                    self.conv.1.clone(),
                    p,
                    None,
                );
                let o = g.conv(
                    &format!("rpn.head.cls_logits[{l}]"),
                    self.cls.0,
                    self.cls.1.clone(),
                    t,
                    None,
                );
                let d = g.conv(
                    &format!("rpn.head.bbox_pred[{l}]"),
                    self.bbox.0,
                    self.bbox.1.clone(),
                    t,
                    None,
                );
                (o, d)
            })
            .collect()
    }
}

/// TwoMLPHead + FastRCNNPredictor as four GEMMs over rows of RoI features.
pub struct BoxMlp {
    pub pooled: usize,
    pub channels: usize,
    pub representation: usize,
    pub num_classes: usize,
    pub fc6: (Conv2d, Arc<ConvWeights>),
    pub fc7: (Conv2d, Arc<ConvWeights>),
    pub cls: (Conv2d, Arc<ConvWeights>),
    pub bbox: (Conv2d, Arc<ConvWeights>),
}

impl BoxMlp {
    /// `channels` = FPN width, `pooled` = RoIAlign output side (7). fc6's input columns are
    /// permuted from torchvision's (c, y, x) flattening to the (y, x, c) order of our
    /// channels-last RoI features, so no transpose runs per image.
    pub fn load(gpu: &Gpu, ws: &WeightStore, channels: usize, pooled: usize) -> Result<BoxMlp> {
        let fc6s = ws
            .shape("roi_heads.box_head.fc6.weight")
            .ok_or_else(|| werr(ws, "tensor roi_heads.box_head.fc6.weight is missing".into()))?
            .to_vec();
        let inputs = channels * pooled * pooled;
        if fc6s.len() != 2 || fc6s[1] != inputs {
            return Err(werr(
                ws,
                format!("tensor roi_heads.box_head.fc6.weight has shape {fc6s:?}, expected [R, {inputs}] (FPN {channels} × {pooled}×{pooled})"),
            ));
        }
        let rep = fc6s[0];
        let classes = ws
            .shape("roi_heads.box_predictor.cls_score.weight")
            .map(|s| s[0])
            .ok_or_else(|| {
                werr(
                    ws,
                    "tensor roi_heads.box_predictor.cls_score.weight is missing".into(),
                )
            })?;
        if classes < 2 {
            return Err(werr(
                ws,
                format!("{classes} classes: need background + at least one"),
            ));
        }
        if let Some(names) = &ws.config.class_names {
            if names.len() != classes {
                return Err(werr(
                    ws,
                    format!(
                        "config has {} class names but the predictor has {classes} classes",
                        names.len()
                    ),
                ));
            }
        }
        let (w6, b6) = {
            let w = ws.get("roi_heads.box_head.fc6.weight", &[rep, inputs])?;
            let b = ws.get("roi_heads.box_head.fc6.bias", &[rep])?.to_vec();
            (
                crate::ops::roi_align::fc6_weight_to_nhwc(w, rep, channels, pooled)?,
                b,
            )
        };
        let lin =
            |name: &str, op: Conv2d, w: &[f32], b: &[f32]| -> Result<(Conv2d, Arc<ConvWeights>)> {
                Ok((op, Arc::new(op.upload(gpu, name, w, b)?)))
            };
        let get = |name: &str, o: usize, i: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                ws.get(&format!("{name}.weight"), &[o, i])?.to_vec(),
                ws.get(&format!("{name}.bias"), &[o])?.to_vec(),
            ))
        };
        let (w7, b7) = get("roi_heads.box_head.fc7", rep, rep)?;
        let (wc, bc) = get("roi_heads.box_predictor.cls_score", classes, rep)?;
        let (wb, bb) = get("roi_heads.box_predictor.bbox_pred", 4 * classes, rep)?;
        Ok(BoxMlp {
            pooled,
            channels,
            representation: rep,
            num_classes: classes,
            fc6: lin(
                "roi_heads.box_head.fc6",
                linear(inputs, rep, true),
                &w6,
                &b6,
            )?,
            fc7: lin("roi_heads.box_head.fc7", linear(rep, rep, true), &w7, &b7)?,
            cls: lin(
                "roi_heads.box_predictor.cls_score",
                linear(rep, classes, false),
                &wc,
                &bc,
            )?,
            bbox: lin(
                "roi_heads.box_predictor.bbox_pred",
                linear(rep, 4 * classes, false),
                &wb,
                &bb,
            )?,
        })
    }

    /// Adds the MLP over `rois` ([1, 1, K, P·P·C] features) → (logits [1,1,K,C], deltas [1,1,K,4C],
    /// the TwoMLPHead representation [1,1,K,R] that the refinement head starts from).
    pub fn add(&self, g: &mut Graph, rois: ValueId) -> (ValueId, ValueId, ValueId) {
        let x6 = g.conv(
            "roi_heads.box_head.fc6",
            self.fc6.0,
            self.fc6.1.clone(),
            rois,
            None,
        );
        let x7 = g.conv(
            "roi_heads.box_head.fc7",
            self.fc7.0,
            self.fc7.1.clone(),
            x6,
            None,
        );
        let l = g.conv(
            "roi_heads.box_predictor.cls_score",
            self.cls.0,
            self.cls.1.clone(),
            x7,
            None,
        );
        let d = g.conv(
            "roi_heads.box_predictor.bbox_pred",
            self.bbox.0,
            self.bbox.1.clone(),
            x7,
            None,
        );
        (l, d, x7)
    }
}
