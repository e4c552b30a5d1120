//! Counting every heap allocation, for `benches/allocations` only: with the
//! `count-allocations` feature the binary's global allocator is [`Counting`], and
//! `/metrics` reports `trellis_allocations_total` and
//! `trellis_allocated_bytes_total`, so a bench can tell how many allocations a
//! request costs. Without the feature, none of this is compiled in.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting each allocation (a reallocation counts as one).
pub struct Counting;

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    BYTES.fetch_add(size as u64, Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Copies the counts into the metrics, just before `/metrics` renders them.
pub fn publish() {
    metrics::describe_counter!("trellis_allocations_total", "heap allocations since start");
    metrics::describe_counter!(
        "trellis_allocated_bytes_total",
        "bytes asked of the heap since start"
    );
    metrics::counter!("trellis_allocations_total").absolute(ALLOCATIONS.load(Relaxed));
    metrics::counter!("trellis_allocated_bytes_total").absolute(BYTES.load(Relaxed));
}
