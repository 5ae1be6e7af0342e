//! A counting global allocator with a cap on live heap bytes. A request that would take
//! the live total past the cap is refused (null): a fallible allocation (`try_reserve`)
//! then reports an error, an infallible one aborts the process. Both fail the fuzz run:
//! a refusal is counted, an abort ends the run with the input that caused it on disk.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
static REFUSED: AtomicUsize = AtomicUsize::new(0);
static LARGEST_REFUSED: AtomicUsize = AtomicUsize::new(0);

fn admit(size: usize) -> bool {
    let live = LIVE.load(Relaxed);
    if live.saturating_add(size) > CAP.load(Relaxed) {
        REFUSED.fetch_add(1, Relaxed);
        LARGEST_REFUSED.fetch_max(size, Relaxed);
        return false;
    }
    true
}

fn added(size: usize) {
    let now = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !admit(l.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(l);
        if !p.is_null() {
            added(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !admit(l.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            added(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if new_size > l.size() && !admit(new_size - l.size()) {
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new_size);
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            added(new_size);
        }
        q
    }
}

/// Caps live heap bytes at `live now + extra` (the fixtures stay under it).
pub fn set_cap_above_now(extra: usize) {
    CAP.store(LIVE.load(Relaxed).saturating_add(extra), Relaxed);
}

/// Resets the peak to the live total, so [`peak_above`] measures one case.
pub fn reset_peak() -> usize {
    let live = LIVE.load(Relaxed);
    PEAK.store(live, Relaxed);
    live
}

pub fn peak_above(base: usize) -> usize {
    PEAK.load(Relaxed).saturating_sub(base)
}

pub fn refused() -> (usize, usize) {
    (REFUSED.load(Relaxed), LARGEST_REFUSED.load(Relaxed))
}
