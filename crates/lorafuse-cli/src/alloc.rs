//! The process allocator of the `lorafuse` binary and of the benches that time what it runs
//! (they include this file with `#[path]`).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory mapped instead of returning it to the OS after mimalloc's purge delay: a
/// training step frees and reallocates gigabytes of activations, and returned pages come back as
/// page faults plus zeroing (a quarter of a CPU training step without this). Call it first in
/// `main`.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); the -sys crate exports no constant for it.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; the option and the
    // value (-1: never purge) are valid, and nothing else is running yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
