//! Weight files: safetensors with torchvision `state_dict` names (current and legacy aliases) and
//! the model config in `__metadata__`. Every problem is an error naming the file and the tensor
//! (or byte range): a truncated file, a hostile header, a wrong dtype, a NaN, a misshaped tensor.
//! The same [`WeightStore`] is also built from seeded generators for tests ([`crate::seedgen`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use safetensors::{Dtype, SafeTensors};

use super::config::{ModelConfig, CONFIG_KEY};
use crate::error::{Error, Result};

/// A host tensor in f32 (f16 / bf16 files are widened at load).
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// All tensors of a model, by canonical torchvision name, plus its config.
pub struct WeightStore {
    /// Where the tensors came from, for error messages ("seedgen(…)" for generated ones).
    pub source: PathBuf,
    pub config: ModelConfig,
    pub metadata: HashMap<String, String>,
    tensors: BTreeMap<String, HostTensor>,
    /// Names handed out so far; [`WeightStore::check_all_used`] reports the rest.
    used: Mutex<BTreeSet<String>>,
    /// FNV-1a 64 of the file bytes (reported with every result so outputs name their model).
    pub hash: u64,
}

/// torchvision's legacy names (pre-`Conv2dNormActivation` checkpoints, semantics §11.2) → current.
pub fn canonical_name(name: &str) -> String {
    for block in ["inner_blocks", "layer_blocks"] {
        let prefix = format!("backbone.fpn.{block}.");
        if let Some(rest) = name.strip_prefix(&prefix) {
            // "{i}.weight" → "{i}.0.weight"
            let parts: Vec<&str> = rest.split('.').collect();
            if parts.len() == 2 && parts[0].parse::<usize>().is_ok() {
                return format!("{prefix}{}.0.{}", parts[0], parts[1]);
            }
        }
    }
    if let Some(p) = name.strip_prefix("rpn.head.conv.") {
        if p == "weight" || p == "bias" {
            return format!("rpn.head.conv.0.0.{p}");
        }
    }
    name.to_string()
}

fn widen(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// FNV-1a 64 over a byte slice (model identity in reports; not a security hash).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    crate::seedgen::fnv1a64(bytes)
}

impl WeightStore {
    /// Reads and validates a marrow safetensors file.
    pub fn open(path: &Path) -> Result<WeightStore> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses safetensors bytes. `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<WeightStore> {
        let err = |message: String| Error::Weights {
            path: path.to_path_buf(),
            message,
        };
        if bytes.len() < 8 {
            return Err(err(format!(
                "{} bytes is too short for a safetensors file (8-byte header length + JSON header)",
                bytes.len()
            )));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if header_len > (bytes.len() as u64 - 8) {
            return Err(err(format!(
                "header claims {header_len} bytes but the file has only {} after the length field: truncated or not safetensors",
                bytes.len() - 8
            )));
        }
        // Name the tensor and byte range a truncated file cuts, before the generic checks (which
        // only say "incomplete metadata").
        let n = header_len as usize;
        let data_start = 8 + n;
        let data_len = bytes.len() - data_start;
        if let Ok(serde_json::Value::Object(header)) =
            serde_json::from_slice::<serde_json::Value>(&bytes[8..data_start])
        {
            let mut cut: Vec<(u64, u64, &str)> = header
                .iter()
                .filter_map(|(name, v)| {
                    let o = v.get("data_offsets")?.as_array()?;
                    Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, name.as_str()))
                })
                .filter(|(_, e, _)| *e > data_len as u64)
                .collect();
            cut.sort();
            if let Some((b, e, name)) = cut.first() {
                return Err(err(format!(
                    "tensor {name}: data bytes {}..{} lie beyond the end of the file ({} bytes): truncated",
                    data_start as u64 + b,
                    data_start as u64 + e,
                    bytes.len()
                )));
            }
        }
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("invalid safetensors header: {e}")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("invalid safetensors file: {e}")))?;
        let metadata: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let config = match metadata.get(CONFIG_KEY) {
            Some(text) => ModelConfig::from_json(text)
                .map_err(|e| err(format!("metadata {CONFIG_KEY}: {e}")))?,
            None => ModelConfig::default(),
        };
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if name.ends_with("num_batches_tracked") {
                continue;
            }
            let data = widen(view.dtype(), view.data()).ok_or_else(|| {
                err(format!(
                    "tensor {name}: dtype {:?} is not supported (expected F32, F16 or BF16)",
                    view.dtype()
                ))
            })?;
            let canon = canonical_name(name);
            if tensors.contains_key(&canon) {
                return Err(err(format!(
                    "tensor {name}: appears twice (as a legacy and a current name for {canon})"
                )));
            }
            tensors.insert(
                canon,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let store = WeightStore {
            source: path.to_path_buf(),
            config,
            metadata,
            tensors,
            used: Mutex::new(BTreeSet::new()),
            hash: fnv1a64(bytes),
        };
        store.check_finite()?;
        Ok(store)
    }

    /// Builds a store from tensors already in memory (seeded test weights).
    pub fn from_tensors(
        source: &str,
        config: ModelConfig,
        tensors: impl IntoIterator<Item = (String, HostTensor)>,
    ) -> Result<WeightStore> {
        let mut h: u64 = 0;
        let tensors: BTreeMap<String, HostTensor> = tensors
            .into_iter()
            .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
            .map(|(n, t)| {
                h = h.rotate_left(5) ^ fnv1a64(n.as_bytes());
                (canonical_name(&n), t)
            })
            .collect();
        let store = WeightStore {
            source: PathBuf::from(source),
            config,
            metadata: HashMap::new(),
            tensors,
            used: Mutex::new(BTreeSet::new()),
            hash: h,
        };
        for (name, t) in &store.tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(store.err(format!(
                    "tensor {name}: {} values for shape {:?}",
                    t.data.len(),
                    t.shape
                )));
            }
        }
        store.check_finite()?;
        Ok(store)
    }

    /// The weights a [`crate::seedgen::SeedSpec`] describes (fixtures, benchmarks), generated in
    /// memory: exactly the tensors torchvision saw when the fixture was made.
    pub fn from_seed_spec(
        spec: &crate::seedgen::SeedSpec,
        config: ModelConfig,
        source: &str,
    ) -> Result<WeightStore> {
        let tensors = spec
            .generate_all()
            .into_iter()
            .map(|(n, shape, data)| (n, HostTensor { shape, data }));
        Self::from_tensors(source, config, tensors)
    }

    fn err(&self, message: String) -> Error {
        Error::Weights {
            path: self.source.clone(),
            message,
        }
    }

    fn check_finite(&self) -> Result<()> {
        for (name, t) in &self.tensors {
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(self.err(format!(
                    "tensor {name}: element {i} is {} (weights must be finite)",
                    t.data[i]
                )));
            }
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// A tensor that must exist with exactly `shape`; marks it used.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let t = self.tensors.get(name).ok_or_else(|| {
            self.err(format!(
                "tensor {name} is missing (expected shape {shape:?})"
            ))
        })?;
        if t.shape != shape {
            return Err(self.err(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.shape
            )));
        }
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        Ok(&t.data)
    }

    /// Errors on tensors under `prefix` that no layer consumed: a file for another architecture
    /// must not half-load silently.
    pub fn check_all_used(&self, prefix: &str) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let extra: Vec<&str> = self
            .tensors
            .keys()
            .filter(|n| n.starts_with(prefix) && !used.contains(*n))
            .map(|s| s.as_str())
            .collect();
        if !extra.is_empty() {
            let shown: Vec<&str> = extra.iter().take(8).copied().collect();
            return Err(self.err(format!(
                "{} unexpected tensor(s) under {prefix:?} that this architecture does not use: {}{}",
                extra.len(),
                shown.join(", "),
                if extra.len() > 8 { ", …" } else { "" }
            )));
        }
        Ok(())
    }

    /// Names outside the parts marrow knows (backbone, rpn, roi_heads, refine).
    pub fn check_known_prefixes(&self) -> Result<()> {
        const KNOWN: [&str; 4] = ["backbone.", "rpn.", "roi_heads.", "refine."];
        if let Some(n) = self
            .tensors
            .keys()
            .find(|n| !KNOWN.iter().any(|k| n.starts_with(k)))
        {
            return Err(self.err(format!(
                "unexpected tensor {n}: marrow knows backbone.*, rpn.*, roi_heads.* and refine.* \
                 (is this a torchvision detection checkpoint? convert it with weights/convert.py)"
            )));
        }
        Ok(())
    }

    /// A conv (+ FrozenBatchNorm2d) folded into (OIHW weight, bias):
    /// `scale = γ / sqrt(var + eps)`, `w' = w·scale`, `b' = β − mean·scale`.
    pub fn conv_bn(&self, conv: &str, bn: &str, shape: [usize; 4]) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = self.get(&format!("{conv}.weight"), &shape)?;
        let c = shape[0];
        let gamma = self.get(&format!("{bn}.weight"), &[c])?;
        let beta = self.get(&format!("{bn}.bias"), &[c])?;
        let mean = self.get(&format!("{bn}.running_mean"), &[c])?;
        let var = self.get(&format!("{bn}.running_var"), &[c])?;
        let eps = self.config.frozen_bn_eps;
        let per = shape[1] * shape[2] * shape[3];
        let mut wf = w.to_vec();
        let mut bias = vec![0f32; c];
        for o in 0..c {
            let d = var[o] + eps;
            // eps = 0 (torchvision's pretrained builder) with a zero variance would be inf: an
            // error naming the channel, not a silent NaN model.
            if d <= 0.0 || !d.is_finite() {
                return Err(self.err(format!(
                    "{bn}.running_var[{o}] = {} with eps {eps}: var + eps must be > 0",
                    var[o]
                )));
            }
            let scale = gamma[o] * (1.0 / d.sqrt());
            for v in &mut wf[o * per..(o + 1) * per] {
                *v *= scale;
            }
            bias[o] = beta[o] - mean[o] * scale;
        }
        Ok((wf, bias))
    }

    /// A conv with its own bias (FPN, RPN head).
    pub fn conv_bias(&self, conv: &str, shape: [usize; 4]) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = self.get(&format!("{conv}.weight"), &shape)?.to_vec();
        let b = self.get(&format!("{conv}.bias"), &[shape[0]])?.to_vec();
        Ok((w, b))
    }

    /// The seedgen spec carried by a fixture, if any.
    pub fn seed_spec(&self) -> Option<&str> {
        self.metadata
            .get(crate::seedgen::SEEDGEN_KEY)
            .map(|s| s.as_str())
    }
}

impl Clone for WeightStore {
    /// A copy with a fresh "used" set (each model built from it checks its own consumption).
    fn clone(&self) -> Self {
        WeightStore {
            source: self.source.clone(),
            config: self.config.clone(),
            metadata: self.metadata.clone(),
            tensors: self.tensors.clone(),
            used: Mutex::new(BTreeSet::new()),
            hash: self.hash,
        }
    }
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("source", &self.source)
            .field("tensors", &self.tensors.len())
            .field("hash", &format_args!("{:016x}", self.hash))
            .finish()
    }
}
