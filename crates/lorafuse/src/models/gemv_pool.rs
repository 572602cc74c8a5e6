//! A small pool for matrix-vector products that stays fast on a busy machine.
//!
//! The calling thread and `n - 1` helper threads (n = Candle's CPU thread count) take chunks of
//! output rows from a shared cursor. The caller never waits for a helper that has not started: if
//! the helpers are descheduled (other processes on the cores), it does every chunk itself and
//! only waits for chunks a helper has actually claimed. Helpers block on a channel between jobs,
//! so an idle pool costs nothing. Pools that spin at a barrier (Candle's, OpenMP's) instead lose a
//! scheduler time slice per product when the cores are oversubscribed.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};

/// Output rows a thread takes per grab: big enough to amortise the cursor, small enough that a
/// late helper still finds work.
const CHUNK: usize = 64;

/// Below this many multiply-adds a product runs on the calling thread alone: waking a helper
/// costs a few microseconds.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A product split by output rows.
pub(crate) trait RowJob: Send + Sync {
    /// Multiply-adds per output row per input row (the input width).
    fn cost_per_output(&self) -> usize;
    /// Computes outputs `outs` for every input row into `dst`, `[rows, outs.len()]` row-major.
    fn compute(&self, outs: Range<usize>, dst: &mut [f32]);
}

struct Shared {
    job: Arc<dyn RowJob>,
    out: Vec<AtomicU32>,
    out_dim: usize,
    rows: usize,
    chunks: usize,
    cursor: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicBool,
}

impl Shared {
    /// Takes chunks until none are left. A chunk that panics still counts as done (and marks
    /// the job failed), so the caller can never wait forever.
    fn work(&self) {
        let mut buf = Vec::new();
        loop {
            let c = self.cursor.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            let outs = c * CHUNK..((c + 1) * CHUNK).min(self.out_dim);
            let n = outs.len();
            buf.clear();
            buf.resize(self.rows * n, 0f32);
            let ok = catch_unwind(AssertUnwindSafe(|| {
                self.job.compute(outs.clone(), &mut buf)
            }));
            match ok {
                Ok(()) => {
                    for r in 0..self.rows {
                        let dst = &self.out[r * self.out_dim + outs.start..][..n];
                        for (d, v) in dst.iter().zip(&buf[r * n..(r + 1) * n]) {
                            d.store(v.to_bits(), Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => self.failed.store(true, Ordering::Relaxed),
            }
            // Release: publishes this chunk's stores to the caller's Acquire load.
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Senders to the helper threads, started on first use.
fn helpers() -> &'static [Sender<Arc<Shared>>] {
    static HELPERS: OnceLock<Vec<Sender<Arc<Shared>>>> = OnceLock::new();
    HELPERS.get_or_init(|| {
        let n = candle_core::utils::get_num_threads().saturating_sub(1);
        (0..n)
            .filter_map(|i| {
                let (tx, rx) = channel::<Arc<Shared>>();
                std::thread::Builder::new()
                    .name(format!("lorafuse-gemv-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job.work();
                        }
                    })
                    .ok()
                    .map(|_| tx)
            })
            .collect()
    })
}

/// Runs `job` for outputs `0..out_dim` and `rows` input rows; returns `[rows, out_dim]`.
pub(crate) fn run(
    job: Arc<dyn RowJob>,
    out_dim: usize,
    rows: usize,
) -> candle_core::Result<Vec<f32>> {
    let macs = job.cost_per_output() * out_dim * rows;
    let helpers = if macs >= PARALLEL_MIN_MACS && out_dim > CHUNK {
        helpers()
    } else {
        &[]
    };
    if helpers.is_empty() {
        // Inline: the job writes straight into the output, already `[rows, out_dim]`.
        let mut out = vec![0f32; rows * out_dim];
        job.compute(0..out_dim, &mut out);
        return Ok(out);
    }
    let shared = Arc::new(Shared {
        job,
        out: (0..rows * out_dim).map(|_| AtomicU32::new(0)).collect(),
        out_dim,
        rows,
        chunks: out_dim.div_ceil(CHUNK),
        cursor: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
    });
    for h in helpers {
        // A helper that has died only means less help.
        let _ = h.send(shared.clone());
    }
    shared.work();
    let mut spins = 0u32;
    while shared.done.load(Ordering::Acquire) < shared.chunks {
        // A helper is finishing a chunk it claimed; if it was descheduled, give it the core.
        spins += 1;
        if spins < 256 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    if shared.failed.load(Ordering::Relaxed) {
        candle_core::bail!("quantized matmul: a worker panicked");
    }
    Ok(shared
        .out
        .iter()
        .map(|a| f32::from_bits(a.load(Ordering::Relaxed)))
        .collect())
}
