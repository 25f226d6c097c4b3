//! The process allocator: mimalloc, told to keep freed memory.
//!
//! A training step allocates and frees tens of large activation and gradient buffers. By default
//! mimalloc hands freed memory back to the kernel after 10 ms, and the next step faults it back in
//! and has the kernel zero it again: a quarter of a `tiny` step's time went to that. With purging
//! off, freed memory is reused directly.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h` (both the v2 and the v3 headers that
/// `libmimalloc-sys` vendors put it at 15; the Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed memory to the operating system.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; mimalloc documents it
    // as callable at any time from any thread, and -1 is a documented value of this option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_15_is_the_purge_delay() {
        // The purge delay is the option whose default is 10 ms in mimalloc v2 and 1000 ms in v3;
        // the options next to it (eager commit delay, NUMA nodes) default to other values.
        // SAFETY: reads mimalloc's option table.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(
            default == 10 || default == 1000,
            "option 15 defaults to {default}"
        );
        keep_freed_memory();
        // SAFETY: as above.
        let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(now, -1);
    }
}
