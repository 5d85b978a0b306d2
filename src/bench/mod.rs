//! Benchmarks (run with `handover bench ...`; never timed tests).

pub mod blackout;
pub mod harness;
pub mod kho;
pub mod snapshot;

/// Median, min and max of a sample.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(v: &[f64]) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Spread {
            median: s[s.len() / 2],
            min: s[0],
            max: s[s.len() - 1],
        }
    }
}
