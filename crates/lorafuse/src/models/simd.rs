//! Compiling plain loops for AVX-512 where the CPU has it.
//!
//! The build targets baseline x86-64 (SSE2), so a loop the compiler vectorises runs 4 lanes wide
//! unless it is compiled inside a function with wider target features. [`wide_fn!`] defines a
//! function that runs an `#[inline(always)]` body through such a twin when the CPU has AVX-512F
//! and FMA (checked once), and as is otherwise: the encoder's elementwise passes (GEMM epilogues,
//! GELU) ran 2-4x slower as SSE. (A closure handed to a target-feature function is not reliably
//! inlined into it, hence the macro.)

/// Whether the CPU has AVX-512F and FMA (detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"))
}

/// `wide_fn!(fn name(arg: Type, ...) => body)`: defines `name`, which calls `body(arg, ...)`
/// (an `#[inline(always)]` function returning `()`) compiled for AVX-512F and FMA when the CPU
/// has them.
macro_rules! wide_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:path) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::models::simd::avx512() {
                    // SAFETY: `avx512()` just checked that the CPU has AVX-512F and FMA.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use wide_fn;
