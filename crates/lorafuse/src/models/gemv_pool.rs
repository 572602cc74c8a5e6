//! A small pool for matrix-vector products (and the tiles of bf16 GEMMs) that stays fast on a busy
//! machine.
//!
//! The calling thread and `n - 1` helper threads (n = Candle's CPU thread count) take chunks of
//! output rows from a shared cursor. The caller never waits for a helper: once the cursor is
//! exhausted it computes any chunk still unfinished itself, so a helper that was descheduled
//! (other processes on the cores) costs at most one duplicated chunk instead of a scheduler time
//! slice. That is sound because a chunk's values do not depend on who computes them: a late
//! helper stores the very same bits. Helpers block on a channel between jobs, so an idle pool
//! costs nothing. Pools that wait at a barrier (Candle's, OpenMP's) instead stall each product
//! whenever the cores are oversubscribed.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};

/// What helpers are sent: a product whose pieces they take from a shared cursor.
trait Work: Send + Sync {
    /// Takes pieces until the cursor runs out.
    fn work(&self, buf: &mut Vec<f32>);
    /// Whether the helper should poll for a next product before blocking (see [`SPIN`]).
    fn spin_after(&self) -> bool {
        true
    }
}

/// Output rows a thread takes per grab: big enough to amortise the cursor, small enough that a
/// late helper still finds work and a duplicated chunk costs little.
const CHUNK: usize = 64;

/// Below this many multiply-adds a product runs on the calling thread alone: waking a helper
/// costs a few microseconds.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A product split by output rows. `compute` must be deterministic: the same range gives the
/// same bits whichever thread runs it.
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
    done: Vec<AtomicBool>,
}

impl Shared {
    fn chunk(&self, c: usize, buf: &mut Vec<f32>) {
        let outs = c * CHUNK..((c + 1) * CHUNK).min(self.out_dim);
        let n = outs.len();
        buf.clear();
        buf.resize(self.rows * n, 0f32);
        self.job.compute(outs.clone(), buf);
        for r in 0..self.rows {
            let dst = &self.out[r * self.out_dim + outs.start..][..n];
            for (d, v) in dst.iter().zip(&buf[r * n..(r + 1) * n]) {
                d.store(v.to_bits(), Ordering::Relaxed);
            }
        }
        // Release: publishes the stores above to whoever sees the flag (Acquire).
        self.done[c].store(true, Ordering::Release);
    }
}

impl Work for Shared {
    fn work(&self, buf: &mut Vec<f32>) {
        loop {
            let c = self.cursor.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            self.chunk(c, buf);
        }
    }
}

/// How long an idle helper polls for the next product before it blocks. A decode step runs its
/// products a few microseconds apart, and waking a blocked thread costs a futex call on each side
/// plus a scheduler hop (~10% of a quantized decode step); blocking only after a quiet spell
/// keeps an idle pool free while a step keeps its helpers awake.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The next job, polled for [`SPIN`] and then waited for; `None` once the pool is gone.
fn next_job(rx: &Receiver<Arc<dyn Work>>, spin: bool) -> Option<Arc<dyn Work>> {
    if !spin {
        return rx.recv().ok();
    }
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if start.elapsed() < SPIN => std::hint::spin_loop(),
            Err(TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

/// Senders to the helper threads, started on first use.
fn helpers() -> &'static [Sender<Arc<dyn Work>>] {
    static HELPERS: OnceLock<Vec<Sender<Arc<dyn Work>>>> = OnceLock::new();
    HELPERS.get_or_init(|| {
        let n = candle_core::utils::get_num_threads().saturating_sub(1);
        (0..n)
            .filter_map(|i| {
                let (tx, rx) = channel::<Arc<dyn Work>>();
                std::thread::Builder::new()
                    .name(format!("lorafuse-gemv-{i}"))
                    .spawn(move || {
                        let mut buf = Vec::new();
                        let mut spin = true;
                        while let Some(job) = next_job(&rx, spin) {
                            // A panicking chunk stays unfinished and the caller computes it (and
                            // reports the panic); this thread lives on.
                            let _ = catch_unwind(AssertUnwindSafe(|| job.work(&mut buf)));
                            spin = job.spin_after();
                        }
                    })
                    .ok()
                    .map(|_| tx)
            })
            .collect()
    })
}

/// Runs `job` for outputs `0..out_dim` and `rows` input rows; returns `[rows, out_dim]`.
pub(crate) fn run(job: Arc<dyn RowJob>, out_dim: usize, rows: usize) -> Vec<f32> {
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
        return out;
    }
    let chunks = out_dim.div_ceil(CHUNK);
    let shared = Arc::new(Shared {
        job,
        out: (0..rows * out_dim).map(|_| AtomicU32::new(0)).collect(),
        out_dim,
        rows,
        chunks,
        cursor: AtomicUsize::new(0),
        done: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
    });
    for h in helpers {
        // A helper that has died only means less help.
        let _ = h.send(shared.clone() as Arc<dyn Work>);
    }
    let mut buf = Vec::new();
    shared.work(&mut buf);
    for c in 0..chunks {
        if !shared.done[c].load(Ordering::Acquire) {
            // Claimed by a helper that has not finished: do it here rather than wait.
            shared.chunk(c, &mut buf);
        }
    }
    shared
        .out
        .iter()
        .map(|a| f32::from_bits(a.load(Ordering::Relaxed)))
        .collect()
}

/// A product split into tiles whose results are separate buffers (a GEMM's output blocks).
/// `compute` must be deterministic, as for [`RowJob`].
pub(crate) trait TileJob: Send + Sync {
    fn tiles(&self) -> usize;
    /// Multiply-adds of the whole product.
    fn macs(&self) -> usize;
    /// Computes tile `t`.
    fn compute(&self, t: usize) -> Vec<f32>;
}

struct TileShared {
    job: Arc<dyn TileJob>,
    cursor: AtomicUsize,
    /// Set by whoever finishes a tile first; a late duplicate is dropped (same values).
    results: Vec<OnceLock<Vec<f32>>>,
}

impl TileShared {
    fn tile(&self, t: usize) {
        let v = self.job.compute(t);
        let _ = self.results[t].set(v);
    }
}

impl Work for TileShared {
    /// Tiled products are an encoder's: between two of them come attention, norms and
    /// activations, which Candle runs on its own threads; a helper polling meanwhile would take
    /// a core from them (on 2 loaded cores a single 29-token document embedded 1.2-1.4x faster
    /// without the polling).
    fn spin_after(&self) -> bool {
        false
    }

    fn work(&self, _: &mut Vec<f32>) {
        loop {
            let t = self.cursor.fetch_add(1, Ordering::Relaxed);
            if t >= self.results.len() {
                return;
            }
            self.tile(t);
        }
    }
}

/// The tiles of a [`run_tiles`] product.
pub(crate) struct TileResults(Arc<TileShared>);

impl TileResults {
    /// Tile `t`'s values (empty if `t` is out of range).
    pub fn get(&self, t: usize) -> &[f32] {
        self.0
            .results
            .get(t)
            .and_then(|r| r.get())
            .map_or(&[], |v| v.as_slice())
    }
}

/// Runs every tile of `job`, on the calling thread and the helpers as [`run`] does (the caller
/// never waits for a helper: it recomputes any tile still unfinished).
pub(crate) fn run_tiles(job: Arc<dyn TileJob>) -> TileResults {
    let tiles = job.tiles();
    let helpers = if job.macs() >= PARALLEL_MIN_MACS && tiles > 1 {
        helpers()
    } else {
        &[]
    };
    let shared = Arc::new(TileShared {
        job,
        cursor: AtomicUsize::new(0),
        results: (0..tiles).map(|_| OnceLock::new()).collect(),
    });
    for h in helpers {
        // A helper that has died only means less help.
        let _ = h.send(shared.clone() as Arc<dyn Work>);
    }
    shared.work(&mut Vec::new());
    for t in 0..tiles {
        if shared.results[t].get().is_none() {
            // Claimed by a helper that has not finished: do it here rather than wait.
            shared.tile(t);
        }
    }
    TileResults(shared)
}
