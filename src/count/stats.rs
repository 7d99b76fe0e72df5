//! The statistics a differential count reports: per-class shares with 95 % Wilson score
//! intervals, and the myeloid:erythroid ratio.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// z for a two-sided 95 % interval (the 0.975 quantile of the standard normal).
pub const Z95: f64 = 1.959_963_984_540_054;

/// One class's share of the counted cells, in percent, with its 95 % Wilson interval (percent).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Share {
    pub percent: f64,
    pub ci95: [f64; 2],
}

/// Wilson score interval for `k` successes in `n` trials, as fractions in [0, 1].
///
/// Why Wilson and not the textbook `p ± z·sqrt(p(1-p)/n)`: a differential routinely has classes
/// with 0–3 cells out of 100–500, where the normal approximation gives intervals below zero or of
/// zero width at p = 0. Wilson's interval stays inside [0, 1] and is wide where the data are few.
/// `n = 0` gives the uninformative [0, 1].
pub fn wilson(k: usize, n: usize, z: f64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    // At k = 0 (k = n) the exact bound is 0 (1); the formula leaves a rounding residue there.
    let lo = if k == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if k as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    [lo, hi]
}

/// Per-class shares of `counts` (class name → cells), in percent with 95 % Wilson intervals.
/// Every class of `classes` gets an entry, zero-count classes included, so that a report always
/// has the same keys.
pub fn differential(
    classes: &[String],
    counts: &BTreeMap<String, usize>,
) -> BTreeMap<String, Share> {
    let total: usize = classes
        .iter()
        .map(|c| counts.get(c).copied().unwrap_or(0))
        .sum();
    classes
        .iter()
        .map(|c| {
            let k = counts.get(c).copied().unwrap_or(0);
            let [lo, hi] = wilson(k, total, Z95);
            let percent = if total == 0 {
                0.0
            } else {
                100.0 * k as f64 / total as f64
            };
            (
                c.clone(),
                Share {
                    percent,
                    ci95: [100.0 * lo, 100.0 * hi],
                },
            )
        })
        .collect()
}

/// Myeloid:erythroid ratio from per-class counts and the model's lineage map (class name →
/// "myeloid" | "erythroid" | anything else, ignored). `None` when the model names no myeloid or no
/// erythroid class, or when no erythroid cell was counted (the ratio is undefined, not infinite).
pub fn me_ratio(
    lineage: Option<&BTreeMap<String, String>>,
    counts: &BTreeMap<String, usize>,
) -> Option<f64> {
    let lineage = lineage?;
    let sum = |which: &str| -> Option<usize> {
        let classes: Vec<&String> = lineage
            .iter()
            .filter(|(_, l)| l.eq_ignore_ascii_case(which))
            .map(|(c, _)| c)
            .collect();
        if classes.is_empty() {
            return None;
        }
        Some(
            classes
                .iter()
                .map(|c| counts.get(*c).copied().unwrap_or(0))
                .sum(),
        )
    };
    let m = sum("myeloid")?;
    let e = sum("erythroid")?;
    (e > 0).then(|| m as f64 / e as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values computed independently of the closed form above: as the two roots of
    /// Wilson's defining quadratic (p̂ − p)² = z² p (1 − p) / n, solved in Python.
    #[test]
    fn wilson_known_values() {
        let cases = [
            (0, 10, [0.0, 0.277_532_799_862_889_2]),
            (5, 10, [0.236_593_090_512_564, 0.763_406_909_487_436]),
            (10, 10, [0.722_467_200_137_111_4, 1.0]),
            (
                1,
                200,
                [0.000_883_168_715_600_977_2, 0.027_773_704_397_892_934],
            ),
            (60, 200, [0.240_747_446_823_714, 0.366_790_683_727_192_65]),
        ];
        for (k, n, want) in cases {
            let got = wilson(k, n, Z95);
            for i in 0..2 {
                assert!(
                    (got[i] - want[i]).abs() < 1e-12,
                    "wilson({k}, {n}) = {got:?}, want {want:?}"
                );
            }
        }
        assert_eq!(wilson(0, 0, Z95), [0.0, 1.0]);
    }

    #[test]
    fn differential_has_every_class_and_sums_to_100() {
        let classes: Vec<String> = ["WBC", "RBC", "platelet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let counts: BTreeMap<String, usize> =
            [("WBC".to_string(), 3), ("RBC".to_string(), 97)].into();
        let d = differential(&classes, &counts);
        assert_eq!(d.len(), 3);
        assert!((d["WBC"].percent - 3.0).abs() < 1e-12);
        assert_eq!(d["platelet"].percent, 0.0);
        assert_eq!(d["platelet"].ci95[0], 0.0);
        assert!(
            d["platelet"].ci95[1] > 0.0,
            "zero count still has an upper bound"
        );
        let sum: f64 = d.values().map(|s| s.percent).sum();
        assert!((sum - 100.0).abs() < 1e-9);
        let empty = differential(&classes, &BTreeMap::new());
        assert!(empty
            .values()
            .all(|s| s.percent == 0.0 && s.ci95 == [0.0, 100.0]));
    }

    #[test]
    fn me_ratio_rules() {
        let lineage: BTreeMap<String, String> = [
            ("granulocyte".to_string(), "myeloid".to_string()),
            ("monocyte".to_string(), "myeloid".to_string()),
            ("erythroblast".to_string(), "erythroid".to_string()),
            ("lymphocyte".to_string(), "lymphoid".to_string()),
        ]
        .into();
        let counts: BTreeMap<String, usize> = [
            ("granulocyte".to_string(), 30),
            ("monocyte".to_string(), 6),
            ("erythroblast".to_string(), 12),
            ("lymphocyte".to_string(), 50),
        ]
        .into();
        assert_eq!(me_ratio(Some(&lineage), &counts), Some(3.0));
        assert_eq!(me_ratio(None, &counts), None);
        let no_e: BTreeMap<String, usize> = [("granulocyte".to_string(), 3)].into();
        assert_eq!(
            me_ratio(Some(&lineage), &no_e),
            None,
            "no erythroid cell counted"
        );
        let only_m: BTreeMap<String, String> =
            [("granulocyte".to_string(), "myeloid".to_string())].into();
        assert_eq!(me_ratio(Some(&only_m), &counts), None, "no erythroid class");
    }
}
