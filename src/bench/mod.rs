//! Benchmarks (run with `handover bench ...`; never timed tests).

pub mod blackout;
pub mod external;
pub mod fleet;
pub mod harness;
pub mod kho;
pub mod kvm_floor;
pub mod live_snapshot;
pub mod snapshot;
pub mod syscall;

/// Percentile `p` (0..=100) of a sample by nearest rank: the smallest value with at least
/// `p`% of the sample at or below it (`ceil(p/100 * n)`-th smallest, at least the first).
/// `None` for an empty sample or `p` outside 0..=100 or NaN.
pub fn nearest_rank(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// Median (p50), p99, min and max of a sample.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Spread {
    /// The middle value, p50 (the upper of the two middle ones for an even count).
    pub median: f64,
    /// The 99th percentile by nearest rank: the smallest value with at least 99% of the sample
    /// at or below it (the maximum for fewer than 100 values, the second largest from 100 on).
    #[serde(default)]
    pub p99: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    #[serde(default)]
    pub n: usize,
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
            p99: nearest_rank(&s, 99.0).unwrap_or(0.0),
            min: s[0],
            max: s[s.len() - 1],
            n: s.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn spread_percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = Spread::of(&v);
        assert_eq!(
            (s.median, s.p99, s.min, s.max, s.n),
            (11.0, 20.0, 1.0, 20.0, 20)
        );
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        let s = Spread::of(&v);
        assert_eq!((s.median, s.p99, s.max), (101.0, 198.0, 200.0));
        assert_eq!(Spread::of(&[]).n, 0);
    }
}
