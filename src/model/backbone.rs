//! ResNet body (18/34 BasicBlock, 50/101 Bottleneck, v1.5: stride in the 3×3) + FPN
//! (P2..P5 and LastLevelMaxPool P6), built as a [`Graph`] from a [`WeightStore`].
//! Every conv is BN-folded with ReLU / residual / FPN top-down add fused into its epilogue.

use std::sync::Arc;

use super::graph::{Graph, ValueId};
use super::weights::WeightStore;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::conv::{Conv2d, ConvWeights, Residual};
use crate::ops::pool::MaxPool2d;

/// The body + FPN shape, inferred from the tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneArch {
    /// Bottleneck (ResNet-50/101) or BasicBlock (ResNet-18/34).
    pub bottleneck: bool,
    pub blocks: [usize; 4],
    pub fpn_channels: usize,
}

impl BackboneArch {
    pub fn infer(ws: &WeightStore) -> Result<BackboneArch> {
        let err = |m: String| Error::Weights {
            path: ws.source.clone(),
            message: m,
        };
        if !ws.contains("backbone.body.conv1.weight") {
            return Err(err(
                "tensor backbone.body.conv1.weight is missing: not a torchvision ResNet-FPN detection checkpoint".into(),
            ));
        }
        let bottleneck = ws.contains("backbone.body.layer1.0.conv3.weight");
        let mut blocks = [0usize; 4];
        for (l, b) in blocks.iter_mut().enumerate() {
            while ws.contains(&format!("backbone.body.layer{}.{}.conv1.weight", l + 1, *b)) {
                *b += 1;
            }
            if *b == 0 {
                return Err(err(format!("backbone.body.layer{} has no blocks", l + 1)));
            }
        }
        let fpn_channels = ws
            .shape("backbone.fpn.inner_blocks.0.0.weight")
            .map(|s| s[0])
            .ok_or_else(|| err("tensor backbone.fpn.inner_blocks.0.0.weight is missing".into()))?;
        let arch = BackboneArch {
            bottleneck,
            blocks,
            fpn_channels,
        };
        if let Some(name) = &ws.config.backbone {
            if &arch.name() != name {
                return Err(err(format!(
                    "config says backbone {name} but the tensors describe {}",
                    arch.name()
                )));
            }
        }
        Ok(arch)
    }

    /// "resnet50" etc., or a description for non-standard depths.
    pub fn name(&self) -> String {
        match (self.bottleneck, self.blocks) {
            (false, [2, 2, 2, 2]) => "resnet18".into(),
            (false, [3, 4, 6, 3]) => "resnet34".into(),
            (true, [3, 4, 6, 3]) => "resnet50".into(),
            (true, [3, 4, 23, 3]) => "resnet101".into(),
            (b, bl) => format!(
                "resnet({} blocks {:?})",
                if b { "bottleneck" } else { "basic" },
                bl
            ),
        }
    }

    pub fn expansion(&self) -> usize {
        if self.bottleneck {
            4
        } else {
            1
        }
    }

    /// Output channels of layer1..layer4 (C2..C5).
    pub fn stage_channels(&self) -> [usize; 4] {
        [64, 128, 256, 512].map(|p| p * self.expansion())
    }
}

/// Builds graphs (whole or in parts) from one weight store, uploading each conv once.
pub struct BackboneBuilder<'a> {
    pub gpu: &'a Gpu,
    pub ws: &'a WeightStore,
    pub arch: BackboneArch,
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    relu: bool,
    residual: Residual,
) -> Conv2d {
    Conv2d {
        cin,
        cout,
        kh: k,
        kw: k,
        stride,
        pad: (k - 1) / 2,
        relu,
        residual,
    }
}

impl<'a> BackboneBuilder<'a> {
    pub fn new(gpu: &'a Gpu, ws: &'a WeightStore) -> Result<Self> {
        let arch = BackboneArch::infer(ws)?;
        Ok(BackboneBuilder { gpu, ws, arch })
    }

    /// A conv named `{prefix}{c}` with its FrozenBN `{prefix}{bn}` folded in; `cb` = (c, bn).
    fn conv_bn(
        &self,
        g: &mut Graph,
        prefix: &str,
        cb: (&str, &str),
        op: Conv2d,
        x: ValueId,
        res: Option<ValueId>,
    ) -> Result<ValueId> {
        let (c, bn) = cb;
        let (w, b) = self.ws.conv_bn(
            &format!("{prefix}{c}"),
            &format!("{prefix}{bn}"),
            [op.cout, op.cin, op.kh, op.kw],
        )?;
        let name = format!("{prefix}{c}");
        let weights = Arc::new(op.upload(self.gpu, &name, &w, &b)?);
        Ok(g.conv(&name, op, weights, x, res))
    }

    fn conv_bias(
        &self,
        g: &mut Graph,
        name: &str,
        op: Conv2d,
        x: ValueId,
        res: Option<ValueId>,
    ) -> Result<ValueId> {
        let (w, b) = self.ws.conv_bias(name, [op.cout, op.cin, op.kh, op.kw])?;
        let weights: Arc<ConvWeights> = Arc::new(op.upload(self.gpu, name, &w, &b)?);
        Ok(g.conv(name, op, weights, x, res))
    }

    /// conv1 7×7/2 + bn1 + ReLU, then max pool 3×3/2.
    pub fn stem(&self, g: &mut Graph, x: ValueId) -> Result<(ValueId, ValueId)> {
        let p = "backbone.body.";
        let c = self.conv_bn(
            g,
            p,
            ("conv1", "bn1"),
            conv(3, 64, 7, 2, true, Residual::None),
            x,
            None,
        )?;
        let pooled = g.pool("backbone.body.maxpool", MaxPool2d::STEM, c);
        Ok((c, pooled))
    }

    /// One residual block of layer `layer` (1-based), block index `idx`.
    pub fn block(&self, g: &mut Graph, layer: usize, idx: usize, x: ValueId) -> Result<ValueId> {
        let planes = 64 << (layer - 1);
        let e = self.arch.expansion();
        let stride = if idx == 0 && layer > 1 { 2 } else { 1 };
        let cin = if idx == 0 {
            if layer == 1 {
                64
            } else {
                (planes / 2) * e
            }
        } else {
            planes * e
        };
        let p = format!("backbone.body.layer{layer}.{idx}.");
        let has_down = self.ws.contains(&format!("{p}downsample.0.weight"));
        let identity = if has_down {
            self.conv_bn(
                g,
                &p,
                ("downsample.0", "downsample.1"),
                conv(cin, planes * e, 1, stride, false, Residual::None),
                x,
                None,
            )?
        } else {
            if stride != 1 || cin != planes * e {
                return Err(Error::Weights {
                    path: self.ws.source.clone(),
                    message: format!(
                        "tensor {p}downsample.0.weight is missing: block changes shape"
                    ),
                });
            }
            x
        };
        if self.arch.bottleneck {
            let a = self.conv_bn(
                g,
                &p,
                ("conv1", "bn1"),
                conv(cin, planes, 1, 1, true, Residual::None),
                x,
                None,
            )?;
            let b = self.conv_bn(
                g,
                &p,
                ("conv2", "bn2"),
                conv(planes, planes, 3, stride, true, Residual::None),
                a,
                None,
            )?;
            self.conv_bn(
                g,
                &p,
                ("conv3", "bn3"),
                conv(planes, planes * 4, 1, 1, true, Residual::Same),
                b,
                Some(identity),
            )
        } else {
            let a = self.conv_bn(
                g,
                &p,
                ("conv1", "bn1"),
                conv(cin, planes, 3, stride, true, Residual::None),
                x,
                None,
            )?;
            self.conv_bn(
                g,
                &p,
                ("conv2", "bn2"),
                conv(planes, planes, 3, 1, true, Residual::Same),
                a,
                Some(identity),
            )
        }
    }

    /// The body from the normalised image to C2..C5.
    pub fn body(&self, g: &mut Graph, image: ValueId) -> Result<[ValueId; 4]> {
        let (_, mut x) = self.stem(g, image)?;
        let mut c = [0; 4];
        for layer in 1..=4 {
            for idx in 0..self.arch.blocks[layer - 1] {
                x = self.block(g, layer, idx, x)?;
            }
            c[layer - 1] = x;
        }
        Ok(c)
    }

    /// FPN: lateral 1×1 convs with the top-down nearest-upsample add fused in, 3×3 output convs,
    /// and P6 = P5[::2, ::2]. Returns P2, P3, P4, P5, P6.
    pub fn fpn(&self, g: &mut Graph, c: [ValueId; 4]) -> Result<[ValueId; 5]> {
        let f = self.arch.fpn_channels;
        let chans = self.arch.stage_channels();
        let mut p = [0; 5];
        let mut last: Option<ValueId> = None;
        for i in (0..4).rev() {
            let residual = if last.is_some() {
                Residual::Nearest
            } else {
                Residual::None
            };
            let lat = self.conv_bias(
                g,
                &format!("backbone.fpn.inner_blocks.{i}.0"),
                conv(chans[i], f, 1, 1, false, residual),
                c[i],
                last,
            )?;
            p[i] = self.conv_bias(
                g,
                &format!("backbone.fpn.layer_blocks.{i}.0"),
                conv(f, f, 3, 1, false, Residual::None),
                lat,
                None,
            )?;
            last = Some(lat);
        }
        p[4] = g.pool(
            "backbone.fpn.extra_blocks.pool",
            MaxPool2d::LAST_LEVEL,
            p[3],
        );
        Ok(p)
    }

    /// image → P2..P6 with outputs named as the reference dump does ("fpn.0" .. "fpn.pool").
    pub fn full(&self) -> Result<Graph> {
        let mut g = Graph::default();
        let x = g.input("transform.image");
        let c = self.body(&mut g, x)?;
        for (i, v) in c.iter().enumerate() {
            g.output(&format!("body.c{}", i + 2), *v);
        }
        let p = self.fpn(&mut g, c)?;
        for (name, v) in FPN_NAMES.iter().zip(p) {
            g.output(name, v);
        }
        self.ws.check_all_used("backbone.")?;
        Ok(g)
    }

    /// C2..C5 → P2..P6 only (teacher-forced FPN).
    pub fn fpn_only(&self) -> Result<Graph> {
        let mut g = Graph::default();
        let c = [0, 1, 2, 3].map(|i| g.input(&format!("body.c{}", i + 2)));
        let p = self.fpn(&mut g, c)?;
        for (name, v) in FPN_NAMES.iter().zip(p) {
            g.output(name, v);
        }
        Ok(g)
    }
}

/// Reference-dump names of the FPN levels (docs/design.md §5).
pub const FPN_NAMES: [&str; 5] = ["fpn.0", "fpn.1", "fpn.2", "fpn.3", "fpn.pool"];
