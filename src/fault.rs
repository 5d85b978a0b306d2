//! Fault injection: make a named step fail, to show that every failure leaves the host (before
//! the exec) or the guests (after it, through rollback) intact.
//!
//! `HANDOVER_FAIL=point[#n][@image],...` makes the `n`-th call (default the first) of `point`
//! fail, in the image whose kexec count is `image` (default: any). Points:
//!
//! | point | where |
//! |---|---|
//! | `kho.alloc`, `kho.preserve`, `kho.finalize`, `kho.restore` | KHO allocations, preservation, the handover tree, restores in the new image |
//! | `luo.preserve`, `luo.freeze`, `luo.retrieve`, `luo.can_finish` | handler callbacks; `luo.freeze:memfd-v2` narrows to one handler |
//! | `luo.serialize`, `luo.deserialize` | writing sessions and files at reboot; reading them at boot |
//! | `kvm.vcpu_snapshot` | reading a preserved vCPU's state for the freeze (`host::kvm::vcpu_snapshot`) |
//! | `kexec.exec` | the `execve` itself |
//! | `boot.refuse` | the new image refuses the whole handover (as an incompatible image would) |
//!
//! An image booted by rollback injects nothing: it is the fallback.
//!
//! A test hook: only builds with the `test-hooks` feature read `HANDOVER_FAIL`. Without it,
//! [`init`] does nothing and [`hit`] is a constant `false`, so every fault point compiles to
//! "no fault".

#[cfg(feature = "test-hooks")]
use std::collections::HashMap;
#[cfg(feature = "test-hooks")]
use std::sync::Mutex;

/// Without `test-hooks`: nothing to arm.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn init(_image: u32, _rollback: bool) {}

/// Without `test-hooks`: no fault, ever.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn hit(_point: &str) -> bool {
    false
}

#[cfg(feature = "test-hooks")]
struct Spec {
    point: String,
    nth: u32,
    image: Option<u32>,
}

#[cfg(feature = "test-hooks")]
struct State {
    specs: Vec<Spec>,
    calls: HashMap<String, u32>,
    image: u32,
    enabled: bool,
}

#[cfg(feature = "test-hooks")]
static STATE: Mutex<Option<State>> = Mutex::new(None);

#[cfg(feature = "test-hooks")]
fn parse(s: &str) -> Vec<Spec> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (p, image) = match p.trim().split_once('@') {
                Some((a, b)) => (a, b.parse().ok()),
                None => (p.trim(), None),
            };
            let (point, nth) = match p.split_once('#') {
                Some((a, b)) => (a, b.parse().unwrap_or(1)),
                None => (p, 1),
            };
            Spec {
                point: point.to_string(),
                nth,
                image,
            }
        })
        .collect()
}

/// Arm fault injection for this image from `HANDOVER_FAIL`.
#[cfg(feature = "test-hooks")]
pub fn init(image: u32, rollback: bool) {
    let specs = std::env::var("HANDOVER_FAIL")
        .map(|s| parse(&s))
        .unwrap_or_default();
    if !specs.is_empty() && !rollback {
        tracing::warn!(
            "fault injection armed: {}",
            std::env::var("HANDOVER_FAIL").unwrap_or_default()
        );
    }
    *STATE.lock().unwrap_or_else(|p| p.into_inner()) = Some(State {
        specs,
        calls: HashMap::new(),
        image,
        enabled: !rollback,
    });
}

/// Should this call of `point` (e.g. `luo.freeze:memfd-v2`) fail? A spec without a `:` suffix
/// matches every suffix.
#[cfg(feature = "test-hooks")]
pub fn hit(point: &str) -> bool {
    let mut g = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = g.as_mut() else { return false };
    if !st.enabled || st.specs.is_empty() {
        return false;
    }
    let base = point.split(':').next().unwrap_or(point);
    let keys: &[&str] = if base == point {
        &[point]
    } else {
        &[point, base]
    };
    let mut fire = false;
    for &key in keys {
        let n = {
            let c = st.calls.entry(key.to_string()).or_insert(0);
            *c += 1;
            *c
        };
        if st
            .specs
            .iter()
            .any(|s| s.point == key && s.nth == n && s.image.is_none_or(|i| i == st.image))
        {
            fire = true;
        }
    }
    if fire {
        tracing::warn!("fault injected at {point}");
    }
    fire
}

#[cfg(all(test, feature = "test-hooks"))]
mod tests {
    #[test]
    fn parse_specs() {
        let v = super::parse("kho.alloc#3, luo.freeze:memfd-v2@1,,boot.refuse");
        assert_eq!(v.len(), 3);
        assert_eq!(
            (v[0].point.as_str(), v[0].nth, v[0].image),
            ("kho.alloc", 3, None)
        );
        assert_eq!(
            (v[1].point.as_str(), v[1].nth, v[1].image),
            ("luo.freeze:memfd-v2", 1, Some(1))
        );
    }
}
