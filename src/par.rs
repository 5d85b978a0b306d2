//! Work spread over threads: each thread takes the next index until none is left.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// `f(i)` for every `i` in `0..n`, on up to `threads` threads named `name` (the calling thread
/// is one of them), the results in index order. A thread that cannot start leaves its share to
/// the others; an item whose `f` panicked is `None`, and the other items still run.
pub fn map_indexed<T: Send>(
    n: usize,
    threads: usize,
    name: &str,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<Option<T>> {
    let out: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = out.get(i) else { return };
        if let Ok(v) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        }
    };
    let threads = threads.clamp(1, n.max(1));
    std::thread::scope(|s| {
        for _ in 1..threads {
            let _ = std::thread::Builder::new()
                .name(name.to_string())
                .spawn_scoped(s, work);
        }
        work();
    });
    out.into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::map_indexed;

    #[test]
    fn every_index_once_in_order() {
        for threads in [0, 1, 2, 5, 64] {
            let v = map_indexed(37, threads, "t", |i| i * 3);
            let want: Vec<_> = (0..37).map(|i| Some(i * 3)).collect();
            assert_eq!(v, want, "{threads} threads");
        }
        assert!(map_indexed(0, 4, "t", |i| i).is_empty());
    }

    #[test]
    fn a_panicking_item_is_none_and_the_rest_run() {
        let v = map_indexed(6, 2, "t", |i| {
            assert_ne!(i, 3, "item 3 panics");
            i
        });
        assert_eq!(v, vec![Some(0), Some(1), Some(2), None, Some(4), Some(5)]);
    }
}
