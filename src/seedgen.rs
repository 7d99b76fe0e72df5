//! seedgen v1: a counter-based seeded weight generator, bit-identical to `weights/seedgen.py`.
//!
//! Test fixtures carry no weights: their metadata key `marrow.seedgen` holds a [`SeedSpec`]
//! (seed, per-prefix scale multipliers, and every tensor's name and shape), and the tests rebuild
//! exactly the f32 weights torchvision saw with [`SeedSpec::generate_all`].
//!
//! Definition (all integer arithmetic wrapping mod 2^64):
//! - `key = splitmix64(seed ^ fnv1a64(utf8(name)))`
//! - `u(i) = (splitmix64(key ^ i) >> 40) / 2^24` for the flat row-major element index `i`
//! - `value(i) = f32(lo + (hi - lo) * u(i))`, computed in f64 and rounded once to f32,
//!   with `(lo, hi)` from [`range_for`].

use std::collections::BTreeMap;

/// Version of the generator definition; [`SeedSpec::from_json`] refuses any other.
pub const SEEDGEN_VERSION: u32 = 1;

/// The metadata key of a fixture that holds the [`SeedSpec`] JSON.
pub const SEEDGEN_KEY: &str = "marrow.seedgen";

/// The metadata key holding `{name: {"sum": f64, "first": [f32; 5]}}` spot checks.
pub const SEEDGEN_CHECK_KEY: &str = "marrow.seedgen.check";

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finaliser (one step of the generator, applied to `x`).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per-tensor key: `splitmix64(seed ^ fnv1a64(name))`.
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    splitmix64(seed ^ fnv1a64(name.as_bytes()))
}

/// The multiplier of the longest key of `scales` that is a prefix of `name` (1.0 if none).
/// On equal-length duplicates the first one wins.
pub fn scale_for(name: &str, scales: &[(String, f32)]) -> f64 {
    let mut best: Option<(usize, f32)> = None;
    for (k, v) in scales {
        if name.starts_with(k.as_str()) && best.is_none_or(|(len, _)| k.len() > len) {
            best = Some((k.len(), *v));
        }
    }
    best.map_or(1.0, |(_, v)| v as f64)
}

/// The uniform range `(lo, hi)` of a tensor, by name suffix and rank, times its scale:
/// `running_var` (0.5, 2), `running_mean` (-0.3, 0.3), 1-D `.weight` (0.5, 1.5), 1-D `.bias`
/// (-0.2, 0.2), ≥2-D `.weight` ±sqrt(6 / fan_in) with fan_in = product(shape[1..]),
/// anything else (-0.1, 0.1).
pub fn range_for(name: &str, shape: &[usize], scales: &[(String, f32)]) -> (f64, f64) {
    let (lo, hi) = if name.ends_with("running_var") {
        (0.5, 2.0)
    } else if name.ends_with("running_mean") {
        (-0.3, 0.3)
    } else if shape.len() == 1 && name.ends_with(".weight") {
        (0.5, 1.5)
    } else if shape.len() == 1 && name.ends_with(".bias") {
        (-0.2, 0.2)
    } else if shape.len() >= 2 && name.ends_with(".weight") {
        let fan_in: usize = shape[1..].iter().product();
        let b = (6.0 / fan_in as f64).sqrt();
        (-b, b)
    } else {
        (-0.1, 0.1)
    };
    let s = scale_for(name, scales);
    (lo * s, hi * s)
}

/// All values of one tensor, flat in row-major order.
pub fn generate(seed: u64, name: &str, shape: &[usize], scales: &[(String, f32)]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (lo, hi) = range_for(name, shape, scales);
    let key = tensor_key(seed, name);
    let span = hi - lo;
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(key ^ i) >> 40) as f64 / 16_777_216.0;
            (lo + span * u) as f32
        })
        .collect()
}

/// The `marrow.seedgen` metadata object.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SeedSpec {
    pub version: u32,
    pub seed: u64,
    #[serde(default)]
    pub scales: BTreeMap<String, f32>,
    /// Every model tensor, in state_dict order: (name, shape).
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl SeedSpec {
    pub fn from_json(s: &str) -> Result<Self, String> {
        let spec: SeedSpec =
            serde_json::from_str(s).map_err(|e| format!("invalid {SEEDGEN_KEY} JSON: {e}"))?;
        if spec.version != SEEDGEN_VERSION {
            return Err(format!(
                "{SEEDGEN_KEY} version {} is not supported (this build implements version {SEEDGEN_VERSION})",
                spec.version
            ));
        }
        Ok(spec)
    }

    pub fn scales_vec(&self) -> Vec<(String, f32)> {
        self.scales.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Every tensor of the spec: (name, shape, values).
    pub fn generate_all(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let scales = self.scales_vec();
        self.tensors
            .iter()
            .map(|(name, shape)| {
                let v = generate(self.seed, name, shape, &scales);
                (name.clone(), shape.clone(), v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 20261125;

    /// Golden values printed by `weights/seedgen.py` (f32 bit patterns of the first five values,
    /// the last two, and the sequential f64 sum in flat order).
    fn check(
        name: &str,
        shape: &[usize],
        scales: &[(&str, f32)],
        first: [u32; 5],
        last: [u32; 2],
        sum: f64,
    ) {
        let scales: Vec<(String, f32)> = scales.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let v = generate(SEED, name, shape, &scales);
        assert_eq!(v.len(), shape.iter().product::<usize>());
        let got_first: Vec<u32> = v[..5].iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            got_first,
            first.to_vec(),
            "{name}: first values diverge from Python"
        );
        let got_last: Vec<u32> = v[v.len() - 2..].iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            got_last,
            last.to_vec(),
            "{name}: last values diverge from Python"
        );
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        assert_eq!(s, sum, "{name}: sum diverges from Python");
    }

    #[test]
    fn hashes() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(splitmix64(0), 0xe220a8397b1dcdaf);
        assert_eq!(splitmix64(1), 0x910a2dec89025cc1);
        assert_eq!(
            tensor_key(SEED, "backbone.body.conv1.weight"),
            0x83750a04aa1e5455
        );
    }

    #[test]
    fn golden_conv_weight() {
        check(
            "backbone.body.conv1.weight",
            &[64, 3, 7, 7],
            &[],
            [0xbdc869d6, 0xbe04abaf, 0xbdbe56ee, 0x3d4f5260, 0xbe10683b],
            [0x3e31ab04, 0xbcf9e482],
            5.061890343015875,
        );
    }

    #[test]
    fn golden_running_var() {
        check(
            "backbone.body.bn1.running_var",
            &[64],
            &[],
            [0x3f0158c2, 0x3ff5bc71, 0x3fa64c00, 0x3fd2918e, 0x3fc446d0],
            [0x3f31a306, 0x3fb46646],
            78.88726621866226,
        );
    }

    #[test]
    fn golden_scaled_and_other() {
        // Longest prefix wins: 0.3, not 2.0.
        check(
            "rpn.head.cls_logits.weight",
            &[3, 64, 1, 1],
            &[("rpn.head.", 2.0), ("rpn.head.cls_logits.", 0.3)],
            [0xbc946163, 0x3d0462a6, 0x3d767fa9, 0xbc15c736, 0x3cd7e201],
            [0xbc9bff6b, 0x3d58e84f],
            1.3857496959972195,
        );
        check(
            "anchors",
            &[7],
            &[],
            [0x3db0ecb3, 0x3dbf81b2, 0xbd201dd6, 0xbd93ec2a, 0xbd90c210],
            [0x3d00d7f0, 0x3d3ac7f0],
            0.07495343685150146,
        );
        check(
            "backbone.body.layer1.0.conv1.weight",
            &[64, 64, 1, 1],
            &[("backbone.", 1.5)],
            [0xbec236ac, 0xbe863e91, 0x3e01a98d, 0x3e5d47e6, 0xbecb5290],
            [0x3eb04284, 0x3eb02e7b],
            22.91351641737856,
        );
    }

    #[test]
    fn ranges() {
        let none: Vec<(String, f32)> = vec![];
        assert_eq!(range_for("a.running_var", &[4], &none), (0.5, 2.0));
        assert_eq!(range_for("a.running_mean", &[4], &none), (-0.3, 0.3));
        assert_eq!(range_for("a.weight", &[4], &none), (0.5, 1.5));
        assert_eq!(range_for("a.bias", &[4], &none), (-0.2, 0.2));
        let b = (6.0f64 / 12.0).sqrt();
        assert_eq!(range_for("a.weight", &[5, 3, 2, 2], &none), (-b, b));
        assert_eq!(range_for("a.bias", &[2, 2], &none), (-0.1, 0.1));
        let sc = vec![("a.".to_string(), 0.5f32)];
        assert_eq!(range_for("a.bias", &[4], &sc), (-0.1, 0.1));
    }

    #[test]
    fn spec_json_roundtrip() {
        let text = r#"{"version":1,"seed":20261125,"scales":{"rpn.head.":2.0,"rpn.head.cls_logits.":0.3},
            "tensors":[["backbone.body.bn1.running_var",[64]],["rpn.head.cls_logits.weight",[3,64,1,1]]]}"#;
        let spec = SeedSpec::from_json(text).unwrap();
        let all = spec.generate_all();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].2[0].to_bits(), 0x3f0158c2);
        assert_eq!(all[1].1, vec![3, 64, 1, 1]);
        assert_eq!(all[1].2[0].to_bits(), 0xbc946163);
        let bad = text.replace("\"version\":1", "\"version\":2");
        assert!(SeedSpec::from_json(&bad).unwrap_err().contains("version 2"));
        assert!(SeedSpec::from_json("{").is_err());
    }
}
