//! Benchmarks (run with `handover bench ...`; never timed tests).

pub mod blackout;
pub mod external;
pub mod harness;
pub mod kho;
pub mod live_snapshot;
pub mod snapshot;
pub mod syscall;

/// Median, min and max of a sample.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Spread {
    /// The middle value (the upper of the two middle ones for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `v`; all zeros for an empty sample.
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
