//! The network: configuration, weights, the graph IR + planner, the backbone, the heads, the
//! detector's stages and the detector.

pub mod backbone;
pub mod config;
pub mod detector;
pub mod graph;
pub mod heads;
pub mod refine;
pub mod stages;
pub mod weights;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Nhwc, Tensor};
use crate::ops::transform::TransformSizes;
use backbone::{BackboneArch, BackboneBuilder};
use stages::{BackboneNet, BackboneStage, PlanCache, Stage};
use weights::WeightStore;

/// An RGB image as the model takes it: planar [3, H, W] f32 in [0, 1] (uint8 / 255).
#[derive(Debug, Clone)]
pub struct ImageF32 {
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl ImageF32 {
    /// From interleaved 8-bit RGB, as torchvision's `convert_image_dtype` does (x / 255 in f32).
    pub fn from_rgb8(w: usize, h: usize, rgb: &[u8]) -> ImageF32 {
        let mut data = vec![0f32; 3 * h * w];
        for i in 0..h * w {
            for c in 0..3 {
                data[c * h * w + i] = rgb[i * 3 + c] as f32 / 255.0;
            }
        }
        ImageF32 { h, w, data }
    }
}

/// The backbone half of the detector on one GPU: transform → ResNet body → FPN, from a file
/// that needs only the `backbone.*` tensors (validation, `marrow features`). Its per-size plans
/// are the detector's own [`BackboneStage`]s in a [`PlanCache`] (src/model/stages.rs), with the
/// body's C2..C5 kept as graph outputs so they can be read back.
pub struct Backbone<'g> {
    pub gpu: &'g Gpu,
    pub arch: BackboneArch,
    pub weights: WeightStore,
    net: BackboneNet,
    plans: PlanCache<BackboneStage>,
}

/// Named host copies of stage outputs (NHWC) for validation and tests.
pub struct StageOutputs {
    pub sizes: TransformSizes,
    pub tensors: Vec<(String, Nhwc, Vec<f32>)>,
}

impl StageOutputs {
    pub fn get(&self, name: &str) -> Option<(&Nhwc, &[f32])> {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, s, d)| (s, d.as_slice()))
    }
}

impl<'g> Backbone<'g> {
    pub fn new(gpu: &'g Gpu, weights: WeightStore) -> Result<Self> {
        weights.check_known_prefixes()?;
        let net = BackboneNet::new(gpu, &weights, true)?;
        weights.check_all_used("backbone.")?;
        Ok(Backbone {
            gpu,
            arch: net.arch.clone(),
            weights,
            net,
            plans: PlanCache::default(),
        })
    }

    /// Runs transform + body + FPN on one image in one submission; reads back the named stages
    /// ("transform.image", "body.c2".."body.c5", "fpn.0".."fpn.pool").
    pub fn run(&mut self, image: &ImageF32) -> Result<StageOutputs> {
        if image.data.len() != 3 * image.h * image.w {
            return Err(Error::shape(
                "image",
                format!("{} values for 3x{}x{}", image.data.len(), image.h, image.w),
            ));
        }
        let (gpu, net, cfg) = (self.gpu, &self.net, &self.weights.config.transform);
        let stage = self.plans.get(image.h, image.w, || {
            BackboneStage::new(gpu, net, cfg, image.h, image.w)
        })?;
        gpu.queue
            .write_buffer(&stage.image.buf, 0, bytemuck::cast_slice(&image.data));
        gpu.run("backbone", stage.segment().dispatches())?;
        let x = &stage.x;
        let mut tensors = vec![("transform.image".to_string(), x.shape, x.read(gpu)?)];
        for (name, t) in &stage.plan.outputs {
            tensors.push((name.clone(), t.shape, t.read(gpu)?));
        }
        Ok(StageOutputs {
            sizes: stage.sizes,
            tensors,
        })
    }

    /// Teacher-forced: body + FPN from a given normalised, padded image [1, Hp, Wp, 3].
    pub fn run_from_transformed(
        &mut self,
        x_nhwc: &[f32],
        shape: Nhwc,
    ) -> Result<Vec<(String, Nhwc, Vec<f32>)>> {
        let x = Tensor::from_host(self.gpu, "transform.image (reference)", shape, x_nhwc)?;
        let plan = self.net.graph.plan(
            self.gpu,
            "backbone (teacher-forced)",
            std::slice::from_ref(&x),
        )?;
        self.gpu
            .run("backbone (teacher-forced)", plan.dispatches())?;
        plan.outputs
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.shape, t.read(self.gpu)?)))
            .collect()
    }

    /// Teacher-forced FPN from given C2..C5 (NHWC).
    pub fn run_fpn(&self, c: &[(Nhwc, Vec<f32>)]) -> Result<Vec<(String, Nhwc, Vec<f32>)>> {
        let g = BackboneBuilder::new(self.gpu, &self.weights)?.fpn_only()?;
        let inputs: Vec<Tensor> = c
            .iter()
            .enumerate()
            .map(|(i, (s, d))| Tensor::from_host(self.gpu, &format!("body.c{}", i + 2), *s, d))
            .collect::<Result<_>>()?;
        let plan = g.plan(self.gpu, "fpn (teacher-forced)", &inputs)?;
        self.gpu.run("fpn (teacher-forced)", plan.dispatches())?;
        plan.outputs
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.shape, t.read(self.gpu)?)))
            .collect()
    }
}
