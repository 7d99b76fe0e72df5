//! The network: configuration, weights, the graph IR + planner, and the backbone.

pub mod backbone;
pub mod config;
pub mod detector;
pub mod graph;
pub mod heads;
pub mod refine;
pub mod weights;

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Nhwc, Tensor};
use crate::ops::transform::{self, TransformSizes};
use backbone::{BackboneArch, BackboneBuilder};
use graph::{Graph, Plan};
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

/// The backbone half of the detector on one GPU: transform → ResNet body → FPN. Plans are cached
/// per input size, so a stream of same-sized images re-uses buffers and dispatches.
pub struct Backbone<'g> {
    pub gpu: &'g Gpu,
    pub arch: BackboneArch,
    pub weights: WeightStore,
    graph: Graph,
    /// Per input size: the image buffer, the transformed image, the transform dispatch and the
    /// body + FPN plan, all recorded once.
    plans: HashMap<(usize, usize), (Tensor, Tensor, Dispatch, Plan)>,
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
        let (arch, graph) = {
            let b = BackboneBuilder::new(gpu, &weights)?;
            (b.arch.clone(), b.full()?)
        };
        Ok(Backbone {
            gpu,
            arch,
            weights,
            graph,
            plans: HashMap::new(),
        })
    }

    /// Runs transform + body + FPN on one image in one submission; reads back the named stages
    /// ("transform.image", "body.c2".."body.c5", "fpn.0".."fpn.pool").
    pub fn run(&mut self, image: &ImageF32) -> Result<StageOutputs> {
        let cfg = self.weights.config.transform.clone();
        if image.data.len() != 3 * image.h * image.w {
            return Err(Error::shape(
                "image",
                format!("{} values for 3x{}x{}", image.data.len(), image.h, image.w),
            ));
        }
        let sizes = TransformSizes::new(image.h, image.w, &cfg)?;
        let key = (image.h, image.w);
        if !self.plans.contains_key(&key) {
            let img = Tensor::new(
                self.gpu,
                "input image [3,H,W]",
                Nhwc::new(1, 3, image.h, image.w),
            )?;
            let x = Tensor::new(
                self.gpu,
                "transform.image",
                Nhwc::new(1, sizes.padded.0, sizes.padded.1, 3),
            )?;
            let plan = self
                .graph
                .plan(self.gpu, "backbone", std::slice::from_ref(&x))?;
            let t = transform::encode(self.gpu, &cfg, &sizes, &img.buf, &x)?;
            self.plans.insert(key, (img, x, t, plan));
        }
        let (img, x, t, plan) = &self.plans[&key];
        self.gpu
            .queue
            .write_buffer(&img.buf, 0, bytemuck::cast_slice(&image.data));
        self.gpu
            .run("backbone", std::iter::once(t).chain(plan.dispatches()))?;
        let mut tensors = vec![("transform.image".to_string(), x.shape, x.read(self.gpu)?)];
        for (name, t) in &plan.outputs {
            tensors.push((name.clone(), t.shape, t.read(self.gpu)?));
        }
        Ok(StageOutputs { sizes, tensors })
    }

    /// Teacher-forced: body + FPN from a given normalised, padded image [1, Hp, Wp, 3].
    pub fn run_from_transformed(
        &mut self,
        x_nhwc: &[f32],
        shape: Nhwc,
    ) -> Result<Vec<(String, Nhwc, Vec<f32>)>> {
        let x = Tensor::from_host(self.gpu, "transform.image (reference)", shape, x_nhwc)?;
        let plan = self.graph.plan(
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
