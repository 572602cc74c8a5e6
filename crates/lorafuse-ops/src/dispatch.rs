//! Which implementation an op runs: the fused kernel or the stock-Candle reference.

use std::sync::atomic::{AtomicU8, Ordering};

/// Chooses between fused kernels and the reference composition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelMode {
    /// Fused kernels wherever the backend, dtype and layout are supported (the default).
    Fused,
    /// Stock Candle ops everywhere: the fallback, forced for debugging and A/B timing.
    Reference,
}

const UNSET: u8 = 0;
const FUSED: u8 = 1;
const REFERENCE: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNSET);

/// The mode in force: `set_kernel_mode` if called, else `LORAFUSE_KERNELS` (`reference` or
/// `fused`), read once, else [`KernelMode::Fused`].
pub fn kernel_mode() -> KernelMode {
    match MODE.load(Ordering::Relaxed) {
        FUSED => KernelMode::Fused,
        REFERENCE => KernelMode::Reference,
        _ => {
            let mode = match std::env::var("LORAFUSE_KERNELS").as_deref() {
                Ok("reference") | Ok("ref") | Ok("fallback") => KernelMode::Reference,
                _ => KernelMode::Fused,
            };
            set_kernel_mode(mode);
            mode
        }
    }
}

/// Overrides the mode for the whole process (the CLI's `--kernels` flag, A/B benchmarks).
pub fn set_kernel_mode(mode: KernelMode) {
    let v = match mode {
        KernelMode::Fused => FUSED,
        KernelMode::Reference => REFERENCE,
    };
    MODE.store(v, Ordering::Relaxed);
}

/// True when the fused path may run at all.
pub(crate) fn fused_enabled() -> bool {
    kernel_mode() == KernelMode::Fused
}
