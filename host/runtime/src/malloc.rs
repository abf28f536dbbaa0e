//! glibc's malloc, tuned for a trainer: every step allocates and frees the same activation-sized
//! buffers (megabytes to tens of megabytes). By default glibc serves those from fresh mmaps, or
//! trims them off the heap's top when freed, so each step faults its activations in again page
//! by page: in four frozen steps of the UNet benchmark, 1.9 M minor page faults and 3.5 s of
//! system time. Serving blocks under 32 MiB from the heap and keeping up to 1 GiB of its free
//! top brings that to 0.45 M and 1.0 s, at the same peak resident memory. Applied when a CPU
//! runtime opens (a GPU's activations are not malloc's); settings the user gave through glibc's
//! environment (`MALLOC_*_`, `GLIBC_TUNABLES`) stay.

/// Applies the settings once per process (Linux with glibc; elsewhere nothing).
pub(crate) fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
            let set = |var: &str, tunable: &str| {
                std::env::var_os(var).is_some() || tunables.contains(tunable)
            };
            // SAFETY: mallopt only changes allocator parameters; any value is valid.
            unsafe {
                if !set("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold") {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                }
                if !set("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold") {
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                }
            }
        });
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// This thread's minor page faults so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            usage.ru_minflt
        }
    }

    /// A freed 8 MiB buffer is reused without faulting its pages in again (glibc's defaults
    /// fault in all 2,048 of them on every allocation).
    #[test]
    fn a_freed_activation_sized_buffer_is_reused_without_page_faults() {
        super::tune();
        let fill = || {
            let v = std::hint::black_box(vec![1u8; 8 << 20]);
            drop(v);
        };
        fill();
        let before = minor_faults();
        fill();
        let faults = minor_faults() - before;
        assert!(
            faults < 256,
            "{faults} page faults for a reused 8 MiB buffer"
        );
    }
}
