//! Compiles every CUDA kernel source `src/<op>/<op>.cu` to `$OUT_DIR/<stem>.ptx` when the `cuda`
//! feature is on; does nothing otherwise, so that CI machines without a CUDA toolkit still build.
//!
//! PTX rather than cubin: the driver JIT-compiles it for the GPU it finds, so one build serves every
//! card at or above `CUDA_COMPUTE_CAP` (default 90, read like candle-kernels does). `--use_fast_math`
//! is deliberately not passed: it turns `expf`/division into approximations that cost the 1e-5 f32
//! parity our tests demand; kernels call the fast intrinsics (`rsqrtf`, `__expf`) where they are safe.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = manifest.join("src");
    // Cargo reruns this script for a changed .cu/.cuh it was told about, not for a new op folder:
    // after adding `src/<op>/<op>.cu`, touch this file once.
    let (sources, headers) = kernel_sources(&src);
    for h in &headers {
        println!("cargo:rerun-if-changed={}", h.display());
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = compute_cap();
    for cu in &sources {
        println!("cargo:rerun-if-changed={}", cu.display());
        let stem = cu
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 kernel file name");
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let output = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=compute_{cap}"))
            .args(["-O3", "-std=c++17", "-lineinfo"])
            .arg("-I")
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .arg(cu)
            .output()
            .unwrap_or_else(|e| {
                panic!("lorafuse-ops: cannot run `{nvcc}` (set NVCC or put nvcc on PATH): {e}")
            });
        if !output.status.success() {
            panic!(
                "lorafuse-ops: nvcc failed on {}:\n{}{}",
                cu.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// `src/*/*.cu` (one per op folder) and every `.cuh` under `src/`, sorted for stable builds.
fn kernel_sources(src: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    let mut visit = |dir: &Path, depth: usize| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut subdirs = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                subdirs.push(path);
            } else if path.extension().is_some_and(|e| e == "cu") && depth == 1 {
                sources.push(path);
            } else if path.extension().is_some_and(|e| e == "cuh") {
                headers.push(path);
            }
        }
        subdirs
    };
    for dir in visit(src, 0) {
        visit(&dir, 1);
    }
    sources.sort();
    headers.sort();
    (sources, headers)
}

/// The compute capability to emit PTX for: `CUDA_COMPUTE_CAP` as `90`, `9.0` or `sm_90`; 90 if unset.
fn compute_cap() -> String {
    let raw = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let digits: String = raw.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let digits = digits
        .trim_start_matches("sm")
        .trim_start_matches("compute")
        .to_string();
    if digits.is_empty() || !digits.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        panic!("lorafuse-ops: CUDA_COMPUTE_CAP={raw:?} is not a compute capability like 90");
    }
    digits
}
