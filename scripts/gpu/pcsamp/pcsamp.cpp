// libpcsamp.so: a CUPTI injection library that collects PC-sampling stall reasons.
//
// Loaded by the CUDA driver through CUDA_INJECTION64_PATH=/abs/path/libpcsamp.so; the driver calls
// InitializeInjection() from cuInit. It then
//   * enables the CUPTI PC Sampling API (cupti_pcsampling.h) on every context it sees created,
//     selecting every stall reason the device reports,
//   * writes each loaded module's cubin (for PTX modules: the driver's JIT output) to
//     $PCSAMP_OUT/cubin_<crc>.cubin, keyed by the CRC that PC sampling reports (cuptiGetCubinCrc),
//   * drains the samples with cuptiPCSamplingGetData after kernel launches, on module load/unload,
//     on context destruction and at process exit, and aggregates them per
//     (cubin crc, function, pcOffset),
//   * writes samples.tsv, summary.txt and some diagnostics into $PCSAMP_OUT when a context is
//     destroyed and at exit.
// Every CUPTI call is checked; on a failure it logs to stderr (and $PCSAMP_OUT/pcsamp.log) and carries
// on without sampling. It never exits or aborts the host program.
//
// Environment (all optional):
//   PCSAMP_OUT          output folder (default ./pcsamp_out), created if missing
//   PCSAMP_PERIOD       sampling period exponent 5..31 (2^N cycles); unset = CUPTI's default
//   PCSAMP_MODE         serialized (default) | continuous
//   PCSAMP_KERNEL       comma-separated substrings; only functions whose name contains one are kept
//   PCSAMP_PCS          PC records per buffer (default 10000)
//   PCSAMP_SCRATCH_MB   CUPTI scratch buffer, MiB (default 64)
//   PCSAMP_HWBUF_MB     hardware buffer, MiB (unset = CUPTI's default, 512 MiB)
//   PCSAMP_SLEEP_MS     CUPTI worker thread sleep span, ms (unset = CUPTI's default, 100)
//   PCSAMP_DRAIN_EVERY  unconditional drain every N launches (default 64; 1 = after every launch)
//   PCSAMP_FLUSH_SEC    also write the outputs every N seconds (default 30; 0 = only at the end)
//   PCSAMP_KEEP_CUBINS  1 = keep every loaded module's cubin, not only those with samples
//   PCSAMP_VERBOSE      1 = log every drain to stderr as well
//   PCSAMP_DISABLE      1 = load but do nothing (to check the injection itself)

#include <cuda.h>
#include <cupti.h>
#include <cupti_pcsampling.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#define PCSAMP_EXPORT extern "C" __attribute__((visibility("default")))

// build.sh links libstdc++ statically (the GPU machine's libstdc++ may be older than ours). gcc 12's
// libstdc++.a drags in std::random_device, which references arc4random (glibc 2.36); the GPU machine is
// only known to have glibc >= 2.34. This local definition satisfies that reference inside the library;
// std::random_device is never used here.
extern "C" __attribute__((visibility("hidden"))) uint32_t arc4random(void) noexcept {
  static uint32_t x = 2463534242u;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return x;
}

namespace {

// ---------------------------------------------------------------- configuration and logging

struct Config {
  std::string out = "pcsamp_out";
  int period = -1;  // -1: CUPTI default
  CUpti_PCSamplingCollectionMode mode = CUPTI_PC_SAMPLING_COLLECTION_MODE_KERNEL_SERIALIZED;
  std::vector<std::string> kernels;
  size_t pcs = 10000;
  size_t scratchBytes = size_t(64) << 20;
  size_t hwbufBytes = 0;  // 0: CUPTI default
  uint32_t sleepMs = 0;   // 0: CUPTI default
  uint64_t drainEvery = 64;
  bool verbose = false;
  bool disable = false;
  bool keepAllCubins = false;
  double flushSec = 30;
};

Config g_cfg;
FILE* g_logFile = nullptr;
std::string g_outDir;       // where samples.tsv etc. go (the folder, or pid<N>/ under it)
std::string g_cubinDir;     // where cubins go (always the top folder)
std::string g_spoolDir;     // every loaded module's cubin goes here first (per process)

void logf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void logf(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "[pcsamp %d] %s\n", (int)getpid(), buf);
  if (g_logFile) {
    fprintf(g_logFile, "%s\n", buf);
    fflush(g_logFile);
  }
}

const char* cuptiErr(CUptiResult r) {
  const char* s = nullptr;
  if (cuptiGetResultString(r, &s) != CUPTI_SUCCESS || !s) return "unknown CUPTI error";
  return s;
}

// Logs a failed CUPTI call; returns true on success.
bool ok(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return true;
  logf("ERROR: %s failed: %d (%s)", what, (int)r, cuptiErr(r));
  if (r == CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)
    logf("       profiling needs privileges: run as root or set the driver option "
         "NVreg_RestrictProfilingToAdminUsers=0");
  if (r == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED)
    logf("       another CUPTI client (profiler, torch.profiler, nsys/ncu, cuda-gdb) is active");
  return false;
}

const char* envs(const char* k) {
  const char* v = getenv(k);
  return (v && *v) ? v : nullptr;
}

long long envll(const char* k, long long dflt) {
  const char* v = envs(k);
  if (!v) return dflt;
  char* end = nullptr;
  long long x = strtoll(v, &end, 10);
  if (!end || *end) {
    logf("WARNING: ignoring %s=%s (not an integer)", k, v);
    return dflt;
  }
  return x;
}

bool mkdirs(const std::string& path) {
  std::string cur;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      if (!cur.empty() && mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) return false;
    }
    if (i < path.size()) cur += path[i];
  }
  return true;
}

// Writes a file atomically (temp + rename) so that a concurrent reader or a second process
// never sees a half-written file.
bool writeFile(const std::string& path, const std::string& data) {
  std::string tmp = path + ".tmp." + std::to_string(getpid());
  FILE* f = fopen(tmp.c_str(), "wb");
  if (!f) {
    logf("ERROR: cannot write %s: %s", tmp.c_str(), strerror(errno));
    return false;
  }
  size_t n = data.empty() ? 0 : fwrite(data.data(), 1, data.size(), f);
  bool good = (n == data.size());
  if (fclose(f) != 0) good = false;
  if (!good || rename(tmp.c_str(), path.c_str()) != 0) {
    logf("ERROR: cannot write %s: %s", path.c_str(), strerror(errno));
    unlink(tmp.c_str());
    return false;
  }
  return true;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[4096];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// Decides where this process writes. The first process to claim the folder writes samples.tsv etc.
// at its top; any other process that uses CUDA with the same environment (a child, say) writes into
// pid<N>/ below it, so that nobody overwrites anybody. Cubins are shared (named by CRC).
void chooseOutDir() {
  g_cubinDir = g_cfg.out;
  g_outDir = g_cfg.out;
  if (!mkdirs(g_cfg.out)) {
    fprintf(stderr, "[pcsamp] ERROR: cannot create %s: %s\n", g_cfg.out.c_str(), strerror(errno));
    return;
  }
  std::string owner = g_cfg.out + "/.owner";
  for (int attempt = 0; attempt < 2; ++attempt) {
    int fd = open(owner.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644);
    if (fd >= 0) {
      std::string s = std::to_string(getpid()) + "\n";
      if (write(fd, s.data(), s.size()) < 0) { /* best effort */ }
      close(fd);
      return;
    }
    // Someone owns it: is it alive?
    FILE* f = fopen(owner.c_str(), "r");
    long pid = 0;
    if (f) {
      if (fscanf(f, "%ld", &pid) != 1) pid = 0;
      fclose(f);
    }
    if (pid == getpid()) return;
    if (pid > 0 && (kill((pid_t)pid, 0) == 0 || errno == EPERM)) break;  // alive: use a subfolder
    unlink(owner.c_str());  // stale (an earlier run): take it over
  }
  g_outDir = g_cfg.out + "/pid" + std::to_string(getpid());
  mkdirs(g_outDir);
}

// Cubins are spooled per process and published into the output folder only if they got samples
// (or with PCSAMP_KEEP_CUBINS=1): a program using cuBLAS can load hundreds of MB of modules.
void publishCubins(bool final);


// ---------------------------------------------------------------- state

struct Key {
  uint64_t crc;
  uint64_t pc;
  uint32_t fid;
  bool operator==(const Key& o) const { return crc == o.crc && pc == o.pc && fid == o.fid; }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = k.crc * 0x9E3779B97F4A7C15ull;
    h ^= k.pc + 0x632BE59BD9B4E019ull + (h << 6) + (h >> 2);
    h ^= uint64_t(k.fid) * 0xC2B2AE3D27D4EB4Full + (h << 6) + (h >> 2);
    return (size_t)h;
  }
};

// One PC-sampling data buffer with its own storage for records and stall-reason arrays.
struct Buffer {
  CUpti_PCSamplingData data;
  std::vector<CUpti_PCSamplingPCData> pcs;
  std::vector<CUpti_PCSamplingStallReason> reasons;
  size_t perPc = 0;

  void init(size_t numPcs, size_t numReasons) {
    perPc = numReasons ? numReasons : 1;
    pcs.assign(numPcs, CUpti_PCSamplingPCData{});
    reasons.assign(numPcs * perPc, CUpti_PCSamplingStallReason{});
    memset(&data, 0, sizeof data);
    data.size = sizeof(CUpti_PCSamplingData);
    data.collectNumPcs = numPcs;
    data.pPcData = pcs.data();
    dirty = numPcs;
    reset();
  }
  // Restores what CUPTI may have overwritten: the header counts and, for the records it filled last
  // time (all of them the first time), their size, capacity and stall-reason pointer.
  size_t dirty = 0;
  void reset() {
    size_t used = std::min(std::max(dirty, (size_t)data.totalNumPcs), pcs.size());
    data.size = sizeof(CUpti_PCSamplingData);
    data.collectNumPcs = pcs.size();
    data.pPcData = pcs.data();
    data.totalNumPcs = 0;
    data.remainingNumPcs = 0;
    data.totalSamples = 0;
    data.droppedSamples = 0;
    data.nonUsrKernelsTotalSamples = 0;
    data.hardwareBufferFull = 0;
    dirty = 0;
    for (size_t i = 0; i < used; ++i) {
      CUpti_PCSamplingPCData& p = pcs[i];
      memset(&p, 0, sizeof p);
      p.size = sizeof(CUpti_PCSamplingPCData);
      p.stallReasonCount = perPc;  // capacity; CUPTI writes the collected count
      p.stallReason = &reasons[i * perPc];
    }
  }
};

struct Ctx {
  CUcontext ctx = nullptr;
  uint32_t uid = 0;
  uint32_t device = 0;
  bool enabled = false;   // sampling enabled and configured
  bool done = false;      // disabled (or broken): never touch CUPTI for it again
  size_t numReasons = 0;
  std::vector<uint32_t> reasonIndex;
  std::vector<std::string> reasonName;
  std::unordered_map<uint32_t, int> col;  // stall reason index -> global column
  Buffer cfgBuf;   // the buffer given to CUPTI in the configuration
  Buffer readBuf;  // the buffer passed to cuptiPCSamplingGetData
  uint64_t launches = 0;
  uint64_t lastDrainLaunch = 0;
  int getDataErrors = 0;
  std::string configText;  // the configuration as read back
};

struct Stats {
  uint64_t getDataCalls = 0, getDataNonEmpty = 0, getDataErrors = 0;
  uint64_t hwBufferFull = 0;
  uint64_t totalSamples = 0, droppedSamples = 0, nonUserSamples = 0;  // sums of the per-call headers
  uint64_t records = 0, recordSamples = 0, filteredRecords = 0, filteredSamples = 0;
  uint64_t unknownReasonSamples = 0, truncatedReasonLists = 0, nullNames = 0;
  uint64_t cfgBufRecordsAfterDisable = 0, cfgBufRemainingAfterDisable = 0;
  uint64_t launches = 0, drains = 0;
};

struct Module {
  uint64_t crc = 0;
  uint32_t moduleId = 0;
  size_t size = 0;
  std::string kind, file;  // file: cubin_<crc>.cubin
  bool spooled = false;    // written to g_spoolDir, not yet published
  bool published = false;  // in g_cubinDir
};

std::recursive_timed_mutex g_mu;
bool g_initialized = false;
bool g_finished = false;  // the exit handler ran: ignore everything afterwards
CUpti_SubscriberHandle g_sub = nullptr;
std::map<CUcontext, Ctx*> g_ctxs;
std::vector<Ctx*> g_deadCtxs;  // destroyed contexts (kept for the summary)
std::vector<std::string> g_columns;  // global stall-reason columns (names)
std::unordered_map<std::string, int> g_columnOf;
std::vector<std::string> g_funcs;  // function names by id
std::unordered_map<std::string, uint32_t> g_funcOf;
std::unordered_map<const char*, uint32_t> g_funcPtr;  // CUPTI's name pointers -> id
std::vector<int8_t> g_funcKept;  // per function: passes PCSAMP_KERNEL
std::unordered_map<Key, std::vector<uint64_t>, KeyHash> g_agg;
std::unordered_map<uint64_t, uint64_t> g_crcSamples;  // samples per cubin crc (kept records)
std::map<uint64_t, Module> g_modules;                 // by crc
std::unordered_map<std::string, uint64_t> g_launchesByName;
Stats g_st;
FILE* g_getDataLog = nullptr;
uint64_t g_getDataLogLines = 0;
const uint64_t kGetDataLogMax = 200000;
std::chrono::steady_clock::time_point g_t0;
double g_lastWrite = 0;

double secs() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - g_t0).count();
}

// ---------------------------------------------------------------- aggregation

uint32_t funcId(const char* name) {
  if (!name) {
    g_st.nullNames++;
    name = "<null>";
  }
  auto it = g_funcPtr.find(name);
  if (it != g_funcPtr.end() && g_funcs[it->second] == name) return it->second;
  uint32_t id;
  auto jt = g_funcOf.find(name);
  if (jt != g_funcOf.end()) {
    id = jt->second;
  } else {
    id = (uint32_t)g_funcs.size();
    g_funcs.emplace_back(name);
    g_funcOf.emplace(name, id);
    bool kept = g_cfg.kernels.empty();
    for (const std::string& k : g_cfg.kernels)
      if (strstr(name, k.c_str())) kept = true;
    g_funcKept.push_back(kept ? 1 : 0);
  }
  g_funcPtr[name] = id;
  return id;
}

int columnFor(const std::string& name) {
  auto it = g_columnOf.find(name);
  if (it != g_columnOf.end()) return it->second;
  int c = (int)g_columns.size();
  g_columns.push_back(name);
  g_columnOf.emplace(name, c);
  return c;
}

void aggregate(Ctx& c, const CUpti_PCSamplingData& d, size_t n, size_t capacity) {
  if (n > capacity) {
    logf("WARNING: CUPTI reported %zu records for a buffer of %zu; reading %zu", n, capacity, capacity);
    n = capacity;
  }
  for (size_t i = 0; i < n; ++i) {
    const CUpti_PCSamplingPCData& p = d.pPcData[i];
    const uint64_t crc = p.cubinCrc;
    const uint64_t pc = p.pcOffset;
    size_t nr = p.stallReasonCount;
    const CUpti_PCSamplingStallReason* sr = p.stallReason;
    uint32_t fid = funcId(p.functionName);
    g_st.records++;
    if (!sr) continue;
    if (nr > c.numReasons) {
      g_st.truncatedReasonLists++;
      nr = c.numReasons;
    }
    uint64_t sum = 0;
    for (size_t j = 0; j < nr; ++j) sum += sr[j].samples;
    g_st.recordSamples += sum;
    if (!g_funcKept[fid]) {
      g_st.filteredRecords++;
      g_st.filteredSamples += sum;
      continue;
    }
    std::vector<uint64_t>& v = g_agg[Key{crc, pc, fid}];
    if (v.size() < g_columns.size()) v.resize(g_columns.size(), 0);
    for (size_t j = 0; j < nr; ++j) {
      const uint32_t idx = sr[j].pcSamplingStallReasonIndex;
      const uint32_t s = sr[j].samples;
      if (!s) continue;
      auto it = c.col.find(idx);
      if (it == c.col.end()) {
        g_st.unknownReasonSamples += s;
        continue;
      }
      v[it->second] += s;
    }
    g_crcSamples[crc] += sum;
  }
}

void logGetData(const Ctx& c, const char* why, CUptiResult r, const CUpti_PCSamplingData& d) {
  if (!g_getDataLog || g_getDataLogLines >= kGetDataLogMax) return;
  if (++g_getDataLogLines == kGetDataLogMax) {
    fprintf(g_getDataLog, "# log capped at %" PRIu64 " lines\n", kGetDataLogMax);
    return;
  }
  fprintf(g_getDataLog,
          "%.6f\t%u\t%s\t%d\t%zu\t%zu\t%" PRIu64 "\t%" PRIu64 "\t%" PRIu64 "\t%" PRIu64 "\t%u\t%zu\t%zu\n",
          secs(), c.uid, why, (int)r, (size_t)d.totalNumPcs, (size_t)d.remainingNumPcs, (uint64_t)d.rangeId,
          (uint64_t)d.totalSamples, (uint64_t)d.droppedSamples, (uint64_t)d.nonUsrKernelsTotalSamples,
          (unsigned)d.hardwareBufferFull, (size_t)c.cfgBuf.data.totalNumPcs,
          (size_t)c.cfgBuf.data.remainingNumPcs);
}

// Moves everything CUPTI holds for the context into the aggregate (cuptiPCSamplingGetData until it
// returns no record). Caller holds g_mu.
void drain(Ctx& c, const char* why) {
  if (!c.enabled || c.done) return;
  g_st.drains++;
  int emptyCalls = 0;
  for (int iter = 0; iter < 1000000; ++iter) {
    c.readBuf.reset();
    CUpti_PCSamplingGetDataParams p;
    memset(&p, 0, sizeof p);
    p.size = CUpti_PCSamplingGetDataParamsSize;
    p.ctx = c.ctx;
    p.pcSamplingData = &c.readBuf.data;
    CUptiResult r = cuptiPCSamplingGetData(&p);
    g_st.getDataCalls++;
    const CUpti_PCSamplingData& d = c.readBuf.data;
    logGetData(c, why, r, d);
    if (r == CUPTI_ERROR_OUT_OF_MEMORY || d.hardwareBufferFull) {
      if (g_st.hwBufferFull++ == 0)
        logf("WARNING: the PC sampling hardware buffer filled up (samples were lost); raise "
             "PCSAMP_HWBUF_MB, lower PCSAMP_SLEEP_MS, or use a larger PCSAMP_PERIOD");
    } else if (r != CUPTI_SUCCESS) {
      c.readBuf.dirty = c.readBuf.pcs.size();  // unknown what it wrote: restore every record next time
      g_st.getDataErrors++;
      if (++c.getDataErrors <= 5) ok(r, "cuptiPCSamplingGetData");
      if (c.getDataErrors == 50) {
        logf("ERROR: cuptiPCSamplingGetData keeps failing on context %u; no longer draining it "
             "(its data will be read once more when sampling is disabled)", c.uid);
      }
      return;
    }
    g_st.totalSamples += d.totalSamples;
    g_st.droppedSamples += d.droppedSamples;
    g_st.nonUserSamples += d.nonUsrKernelsTotalSamples;
    const size_t n = d.totalNumPcs;
    c.readBuf.dirty = std::min(n, c.readBuf.pcs.size());
    if (n) g_st.getDataNonEmpty++;
    aggregate(c, d, n, c.readBuf.pcs.size());
    if (g_cfg.verbose)
      logf("drain(%s) ctx %u: %zu records, %zu remaining, totalSamples %" PRIu64, why, c.uid, n,
           (size_t)d.remainingNumPcs, (uint64_t)d.totalSamples);
    if (n == 0) {
      // Done unless CUPTI says more is waiting; two empty answers in a row end it anyway.
      const bool pending = d.remainingNumPcs > 0 || c.cfgBuf.data.totalNumPcs > 0;
      if (!pending || ++emptyCalls >= 2) break;
      if (r == CUPTI_ERROR_OUT_OF_MEMORY) break;
    } else {
      emptyCalls = 0;
    }
  }
  c.lastDrainLaunch = c.launches;
}

// Final collection for a context: drain, disable (CUPTI then flushes what is left into the buffer
// given at configuration), and read that buffer. Caller holds g_mu.
void finishCtx(Ctx& c, const char* why) {
  if (!c.enabled || c.done) return;
  drain(c, why);
  CUpti_PCSamplingDisableParams dp;
  memset(&dp, 0, sizeof dp);
  dp.size = CUpti_PCSamplingDisableParamsSize;
  dp.ctx = c.ctx;
  // GetData moves the records CUPTI parked in the configuration buffer, so after the drain it should
  // report none; anything it reports after the disable is the final flush.
  if (c.cfgBuf.data.totalNumPcs)
    logf("WARNING: context %u: the configuration buffer still reports %zu records after draining; not "
         "counted (they may duplicate drained ones)", c.uid, (size_t)c.cfgBuf.data.totalNumPcs);
  c.cfgBuf.data.totalNumPcs = 0;
  c.cfgBuf.data.remainingNumPcs = 0;
  CUptiResult r = cuptiPCSamplingDisable(&dp);
  c.done = true;
  if (!ok(r, "cuptiPCSamplingDisable")) return;
  const CUpti_PCSamplingData& d = c.cfgBuf.data;
  const size_t n = d.totalNumPcs;
  g_st.cfgBufRecordsAfterDisable += n;
  g_st.cfgBufRemainingAfterDisable += d.remainingNumPcs;
  logGetData(c, "after-disable", r, d);
  if (n) {
    g_st.totalSamples += d.totalSamples;
    g_st.droppedSamples += d.droppedSamples;
    g_st.nonUserSamples += d.nonUsrKernelsTotalSamples;
    aggregate(c, d, n, c.cfgBuf.pcs.size());
  }
  if (d.remainingNumPcs)
    logf("WARNING: %zu PC records were discarded at disable (raise PCSAMP_PCS)", (size_t)d.remainingNumPcs);
  logf("context %u: sampling disabled (%s); %" PRIu64 " launches seen; %zu records read after disable",
       c.uid, why, c.launches, n);
}

// ---------------------------------------------------------------- output

bool isNotIssued(const std::string& n) {
  const std::string suf = "_not_issued";
  return n.size() >= suf.size() && n.compare(n.size() - suf.size(), suf.size(), suf) == 0;
}

std::string shortName(const std::string& n) {
  static const char* prefixes[] = {"smsp__pcsamp_warps_issue_stalled_", "smsp__pcsamp_", nullptr};
  for (int i = 0; prefixes[i]; ++i) {
    size_t l = strlen(prefixes[i]);
    if (n.compare(0, l, prefixes[i]) == 0) return n.substr(l);
  }
  return n;
}

// The columns that make up "total": the all-samples reasons (names without _not_issued), each sample
// being counted in exactly one of them; the _not_issued columns are a subset view (samples in which the
// warp issued nothing). If the names do not follow that pattern, every column counts.
std::vector<char> totalMask() {
  std::vector<char> m(g_columns.size(), 1);
  bool anyNot = false, anyAll = false;
  for (const auto& c : g_columns) (isNotIssued(c) ? anyNot : anyAll) = true;
  if (anyNot && anyAll)
    for (size_t i = 0; i < g_columns.size(); ++i) m[i] = !isNotIssued(g_columns[i]);
  return m;
}

void publishCubins(bool final) {
  for (auto& kv : g_modules) {
    Module& m = kv.second;
    if (!m.spooled || m.published) continue;
    std::string spool = g_spoolDir + "/" + m.file, dest = g_cubinDir + "/" + m.file;
    auto it = g_crcSamples.find(m.crc);
    if (it != g_crcSamples.end() && it->second > 0) {
      if (rename(spool.c_str(), dest.c_str()) == 0) {
        m.published = true;
        m.spooled = false;
      } else {
        logf("ERROR: cannot move %s to %s: %s", spool.c_str(), dest.c_str(), strerror(errno));
      }
    } else if (final) {
      unlink(spool.c_str());
      m.spooled = false;
    }
  }
  if (final && !g_spoolDir.empty()) rmdir(g_spoolDir.c_str());
}

void writeOutputs(const char* why, bool final = false) {
  if (g_outDir.empty()) return;
  g_lastWrite = secs();
  publishCubins(final);
  const size_t nc = g_columns.size();
  const std::vector<char> mask = totalMask();

  // samples.tsv, sorted by (function, crc, pc)
  std::vector<const std::pair<const Key, std::vector<uint64_t>>*> rows;
  rows.reserve(g_agg.size());
  for (const auto& kv : g_agg) rows.push_back(&kv);
  std::sort(rows.begin(), rows.end(), [](auto* a, auto* b) {
    const Key &x = a->first, &y = b->first;
    if (x.fid != y.fid) return g_funcs[x.fid] < g_funcs[y.fid];
    if (x.crc != y.crc) return x.crc < y.crc;
    return x.pc < y.pc;
  });
  std::string t = "crc\tfunction\tpcOffset\ttotal";
  for (const auto& c : g_columns) t += "\t" + c;
  t += "\n";
  struct FnAgg {
    uint64_t total = 0;
    std::vector<uint64_t> cols;
    std::unordered_set<uint64_t> crcs;
    size_t pcs = 0;
  };
  std::map<uint32_t, FnAgg> fn;
  uint64_t grand = 0, sumAll = 0, sumNot = 0, subsetViolations = 0;
  for (auto* kv : rows) {
    const Key& k = kv->first;
    std::vector<uint64_t> v = kv->second;
    v.resize(nc, 0);
    uint64_t total = 0, rowAll = 0;
    for (size_t i = 0; i < nc; ++i) {
      if (mask[i]) total += v[i];
      else sumNot += v[i];
      rowAll += v[i];
    }
    sumAll += rowAll;
    // subset check: X_not_issued <= X for every X
    for (size_t i = 0; i < nc; ++i) {
      if (!isNotIssued(g_columns[i]) || !v[i]) continue;
      std::string base = g_columns[i].substr(0, g_columns[i].size() - strlen("_not_issued"));
      auto it = g_columnOf.find(base);
      if (it == g_columnOf.end() || v[it->second] < v[i]) subsetViolations++;
    }
    if (!rowAll) continue;
    grand += total;
    FnAgg& f = fn[k.fid];
    f.total += total;
    f.cols.resize(nc, 0);
    for (size_t i = 0; i < nc; ++i) f.cols[i] += v[i];
    f.crcs.insert(k.crc);
    f.pcs++;
    t += fmt("%016" PRIx64 "\t", k.crc) + g_funcs[k.fid] + fmt("\t0x%04" PRIx64 "\t%" PRIu64, k.pc, total);
    for (size_t i = 0; i < nc; ++i) t += fmt("\t%" PRIu64, v[i]);
    t += "\n";
  }
  writeFile(g_outDir + "/samples.tsv", t);

  // stall_reasons.tsv
  std::string sr = "column\tname\tcounts_in_total\n";
  for (size_t i = 0; i < nc; ++i) sr += fmt("%zu\t%s\t%d\n", i, g_columns[i].c_str(), (int)mask[i]);
  sr += "# per context: cupti index -> name\n";
  auto dumpCtx = [&](const Ctx* c) {
    for (size_t i = 0; i < c->reasonIndex.size(); ++i)
      sr += fmt("# ctx %u\t%u\t%s\n", c->uid, c->reasonIndex[i], c->reasonName[i].c_str());
  };
  for (auto& kv : g_ctxs) dumpCtx(kv.second);
  for (const Ctx* c : g_deadCtxs) dumpCtx(c);
  writeFile(g_outDir + "/stall_reasons.tsv", sr);

  // modules.tsv
  std::string mt = "crc\tmoduleId\tbytes\tkind\tfile\tall_reason_counts\n";
  for (const auto& kv : g_modules) {
    const Module& m = kv.second;
    auto it = g_crcSamples.find(m.crc);
    mt += fmt("%016" PRIx64 "\t%u\t%zu\t%s\t%s\t%" PRIu64 "\n", m.crc, m.moduleId, m.size, m.kind.c_str(),
              m.published ? m.file.c_str() : (m.spooled ? "(spooled)" : "(not kept: no samples)"),
              it == g_crcSamples.end() ? 0 : it->second);
  }
  for (const auto& kv : g_crcSamples)
    if (!g_modules.count(kv.first))
      mt += fmt("%016" PRIx64 "\t-\t-\tMISSING\t-\t%" PRIu64 "\n", kv.first, kv.second);
  writeFile(g_outDir + "/modules.tsv", mt);

  // summary.txt
  std::string s;
  s += fmt("# pcsamp summary (pid %d, written at %s, %.1f s after init)\n", (int)getpid(), why, secs());
  uint32_t ver = 0;
  cuptiGetVersion(&ver);
  s += fmt("cupti api version: %u (built against %d)\n", ver, CUPTI_API_VERSION);
  s += fmt("mode: %s; kernel filter: %s\n",
           g_cfg.mode == CUPTI_PC_SAMPLING_COLLECTION_MODE_CONTINUOUS ? "continuous" : "kernel-serialized",
           g_cfg.kernels.empty() ? "(none)" : envs("PCSAMP_KERNEL"));
  auto ctxLine = [&](const Ctx* c) {
    s += fmt("context %u (device %u): %s; launches %" PRIu64 "; %zu stall reasons\n", c->uid, c->device,
             c->done ? "finished" : (c->enabled ? "sampling" : "NOT sampling"), c->launches, c->numReasons);
    if (!c->configText.empty()) s += "  config read back: " + c->configText + "\n";
  };
  for (auto& kv : g_ctxs) ctxLine(kv.second);
  for (const Ctx* c : g_deadCtxs) ctxLine(c);
  s += fmt("launches seen: %" PRIu64 "; drains: %" PRIu64 "; GetData calls: %" PRIu64 " (%" PRIu64
           " with records, %" PRIu64 " errors); hardware-buffer-full: %" PRIu64 "\n",
           g_st.launches, g_st.drains, g_st.getDataCalls, g_st.getDataNonEmpty, g_st.getDataErrors,
           g_st.hwBufferFull);
  s += fmt("CUPTI headers, summed over calls: totalSamples %" PRIu64 ", droppedSamples %" PRIu64
           ", nonUsrKernelsTotalSamples %" PRIu64 "\n",
           g_st.totalSamples, g_st.droppedSamples, g_st.nonUserSamples);
  s += fmt("records read: %" PRIu64 " (sum of all their reason counts %" PRIu64 "); filtered out: %" PRIu64
           " records, %" PRIu64 " samples; records after disable: %" PRIu64 " (+%" PRIu64 " discarded)\n",
           g_st.records, g_st.recordSamples, g_st.filteredRecords, g_st.filteredSamples,
           g_st.cfgBufRecordsAfterDisable, g_st.cfgBufRemainingAfterDisable);
  s += fmt("kept: total %" PRIu64 " (all-samples reasons), not-issued %" PRIu64 ", all columns %" PRIu64
           "; X_not_issued > X at %" PRIu64 " (pc, reason) pairs%s\n",
           grand, sumNot, sumAll, subsetViolations,
           subsetViolations ? "  <-- _not_issued is NOT a subset: check the totals" : "");
  if (g_st.unknownReasonSamples || g_st.truncatedReasonLists || g_st.nullNames)
    s += fmt("anomalies: samples with unknown reason index %" PRIu64 ", truncated reason lists %" PRIu64
             ", records without a function name %" PRIu64 "\n",
             g_st.unknownReasonSamples, g_st.truncatedReasonLists, g_st.nullNames);
  s += fmt("distinct function-name pointers from CUPTI: %zu for %zu names\n", g_funcPtr.size(), g_funcs.size());
  {
    size_t pub = 0;
    for (const auto& kv : g_modules) pub += kv.second.published;
    s += fmt("modules loaded: %zu, cubins kept (with samples): %zu; ", g_modules.size(), pub);
  }
  s += "cubin crcs with samples but no cubin: ";
  {
    int missing = 0;
    for (const auto& kv : g_crcSamples)
      if (!g_modules.count(kv.first)) {
        s += fmt("%s%016" PRIx64, missing ? ", " : "", kv.first);
        missing++;
      }
    if (!missing) s += "none";
    s += "\n";
  }
  s += "\n";
  std::vector<std::pair<uint64_t, uint32_t>> order;
  for (auto& kv : fn) order.push_back({kv.second.total, kv.first});
  std::sort(order.rbegin(), order.rend());
  s += fmt("%-10s %7s %6s  %s\n", "samples", "share", "pcs", "function");
  for (auto& o : order) {
    const FnAgg& f = fn[o.second];
    s += fmt("%-10" PRIu64 " %6.2f%% %6zu  %s\n", f.total, grand ? 100.0 * f.total / grand : 0.0, f.pcs,
             g_funcs[o.second].c_str());
  }
  for (auto& o : order) {
    const FnAgg& f = fn[o.second];
    s += "\n== " + g_funcs[o.second] + fmt("\n   %" PRIu64 " samples (%.2f%% of all), %zu PCs, cubin", f.total,
                                            grand ? 100.0 * f.total / grand : 0.0, f.pcs);
    for (uint64_t crc : f.crcs) s += fmt(" %016" PRIx64, crc);
    s += "\n";
    auto launches = g_launchesByName.find(g_funcs[o.second]);
    if (launches != g_launchesByName.end()) s += fmt("   launches: %" PRIu64 "\n", launches->second);
    for (int pass = 0; pass < 2; ++pass) {
      std::vector<std::pair<uint64_t, size_t>> rs;
      uint64_t denom = 0;
      for (size_t i = 0; i < nc; ++i) {
        bool inPass = pass == 0 ? (bool)mask[i] : (!mask[i]);
        if (!inPass) continue;
        denom += f.cols[i];
        if (f.cols[i]) rs.push_back({f.cols[i], i});
      }
      if (rs.empty()) continue;
      std::sort(rs.rbegin(), rs.rend());
      s += pass == 0 ? "   stall reasons (share of the function's samples):\n"
                     : fmt("   not-issued samples: %" PRIu64 " (%.1f%% of the function's samples):\n", denom,
                           f.total ? 100.0 * denom / f.total : 0.0);
      for (auto& r : rs)
        s += fmt("     %6.2f%%  %10" PRIu64 "  %s\n", denom ? 100.0 * r.first / denom : 0.0, r.first,
                 shortName(g_columns[r.second]).c_str());
    }
  }
  writeFile(g_outDir + "/summary.txt", s);
  if (strcmp(why, "periodic") != 0 || g_cfg.verbose)
    logf("wrote %s/{samples.tsv,summary.txt,modules.tsv,stall_reasons.tsv} (%s): %zu PCs, %" PRIu64
       " samples in %zu functions",
       g_outDir.c_str(), why, rows.size(), grand, fn.size());
}

// ---------------------------------------------------------------- callbacks

std::string readConfig(Ctx& c) {
  CUpti_PCSamplingConfigurationInfo info[6];
  memset(info, 0, sizeof info);
  info[0].attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SAMPLING_PERIOD;
  info[1].attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SCRATCH_BUFFER_SIZE;
  info[2].attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_HARDWARE_BUFFER_SIZE;
  info[3].attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_COLLECTION_MODE;
  info[4].attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_ENABLE_START_STOP_CONTROL;
  info[5].attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_WORKER_THREAD_PERIODIC_SLEEP_SPAN;
  CUpti_PCSamplingConfigurationInfoParams p;
  memset(&p, 0, sizeof p);
  p.size = CUpti_PCSamplingConfigurationInfoParamsSize;
  p.ctx = c.ctx;
  p.numAttributes = 6;
  p.pPCSamplingConfigurationInfo = info;
  CUptiResult r = cuptiPCSamplingGetConfigurationAttribute(&p);
  if (r != CUPTI_SUCCESS) return fmt("(cuptiPCSamplingGetConfigurationAttribute failed: %d %s)", (int)r, cuptiErr(r));
  std::string s;
  auto st = [&](int i) { return info[i].attributeStatus == CUPTI_SUCCESS; };
  if (st(0)) {
    unsigned e = info[0].attributeData.samplingPeriodData.samplingPeriod;
    s += (e >= 5 && e <= 31) ? fmt("period %u (2^%u cycles)", e, e) : fmt("period %u (raw value)", e);
  }
  if (st(1)) s += fmt(", scratch %zu MiB", info[1].attributeData.scratchBufferSizeData.scratchBufferSize >> 20);
  if (st(2)) s += fmt(", hw buffer %zu MiB", info[2].attributeData.hardwareBufferSizeData.hardwareBufferSize >> 20);
  if (st(3)) s += fmt(", collection mode %d", (int)info[3].attributeData.collectionModeData.collectionMode);
  if (st(4)) s += fmt(", start/stop control %u", info[4].attributeData.enableStartStopControlData.enableStartStopControl);
  if (st(5)) s += fmt(", worker sleep %u ms", info[5].attributeData.workerThreadPeriodicSleepSpanData.workerThreadPeriodicSleepSpan);
  s += fmt(", %zu PC records per buffer", c.cfgBuf.pcs.size());
  return s;
}

bool configure(Ctx& c) {
  // stall reasons
  size_t num = 0;
  CUpti_PCSamplingGetNumStallReasonsParams np;
  memset(&np, 0, sizeof np);
  np.size = CUpti_PCSamplingGetNumStallReasonsParamsSize;
  np.ctx = c.ctx;
  np.numStallReasons = &num;
  if (!ok(cuptiPCSamplingGetNumStallReasons(&np), "cuptiPCSamplingGetNumStallReasons")) return false;
  if (num == 0 || num > 4096) {
    logf("ERROR: implausible stall reason count %zu", num);
    return false;
  }
  std::vector<std::vector<char>> nameBufs(num, std::vector<char>(CUPTI_STALL_REASON_STRING_SIZE, 0));
  std::vector<char*> names(num);
  for (size_t i = 0; i < num; ++i) names[i] = nameBufs[i].data();
  c.reasonIndex.assign(num, 0);
  CUpti_PCSamplingGetStallReasonsParams sp;
  memset(&sp, 0, sizeof sp);
  sp.size = CUpti_PCSamplingGetStallReasonsParamsSize;
  sp.ctx = c.ctx;
  sp.numStallReasons = num;
  sp.stallReasonIndex = c.reasonIndex.data();
  sp.stallReasons = names.data();
  if (!ok(cuptiPCSamplingGetStallReasons(&sp), "cuptiPCSamplingGetStallReasons")) return false;
  c.numReasons = num;
  c.reasonName.clear();
  for (size_t i = 0; i < num; ++i) {
    nameBufs[i][CUPTI_STALL_REASON_STRING_SIZE - 1] = 0;
    c.reasonName.emplace_back(names[i]);
    c.col[c.reasonIndex[i]] = columnFor(c.reasonName.back());
  }

  c.cfgBuf.init(g_cfg.pcs, num);
  c.readBuf.init(g_cfg.pcs, num);

  // configuration: required attributes first, optional ones after
  std::vector<CUpti_PCSamplingConfigurationInfo> req, opt;
  CUpti_PCSamplingConfigurationInfo a;
  memset(&a, 0, sizeof a);
  a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_STALL_REASON;
  a.attributeData.stallReasonData.stallReasonCount = num;
  a.attributeData.stallReasonData.pStallReasonIndex = c.reasonIndex.data();
  req.push_back(a);
  memset(&a, 0, sizeof a);
  a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SAMPLING_DATA_BUFFER;
  a.attributeData.samplingDataBufferData.samplingDataBuffer = &c.cfgBuf.data;
  req.push_back(a);
  memset(&a, 0, sizeof a);
  a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_COLLECTION_MODE;
  a.attributeData.collectionModeData.collectionMode = g_cfg.mode;
  req.push_back(a);
  memset(&a, 0, sizeof a);
  a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_OUTPUT_DATA_FORMAT;
  a.attributeData.outputDataFormatData.outputDataFormat = CUPTI_PC_SAMPLING_OUTPUT_DATA_FORMAT_PARSED;
  req.push_back(a);
  if (g_cfg.period >= 0) {
    memset(&a, 0, sizeof a);
    a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SAMPLING_PERIOD;
    a.attributeData.samplingPeriodData.samplingPeriod = (uint32_t)g_cfg.period;
    opt.push_back(a);
  }
  if (g_cfg.scratchBytes) {
    memset(&a, 0, sizeof a);
    a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_SCRATCH_BUFFER_SIZE;
    a.attributeData.scratchBufferSizeData.scratchBufferSize = g_cfg.scratchBytes;
    opt.push_back(a);
  }
  if (g_cfg.hwbufBytes) {
    memset(&a, 0, sizeof a);
    a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_HARDWARE_BUFFER_SIZE;
    a.attributeData.hardwareBufferSizeData.hardwareBufferSize = g_cfg.hwbufBytes;
    opt.push_back(a);
  }
  if (g_cfg.sleepMs) {
    memset(&a, 0, sizeof a);
    a.attributeType = CUPTI_PC_SAMPLING_CONFIGURATION_ATTR_TYPE_WORKER_THREAD_PERIODIC_SLEEP_SPAN;
    a.attributeData.workerThreadPeriodicSleepSpanData.workerThreadPeriodicSleepSpan = g_cfg.sleepMs;
    opt.push_back(a);
  }
  static const char* attrNames[] = {"INVALID", "SAMPLING_PERIOD", "STALL_REASON", "SCRATCH_BUFFER_SIZE",
                                    "HARDWARE_BUFFER_SIZE", "COLLECTION_MODE", "ENABLE_START_STOP_CONTROL",
                                    "OUTPUT_DATA_FORMAT", "SAMPLING_DATA_BUFFER", "WORKER_THREAD_PERIODIC_SLEEP_SPAN"};
  auto attrName = [&](int t) { return (t >= 0 && t <= 9) ? attrNames[t] : "?"; };
  auto setAll = [&](std::vector<CUpti_PCSamplingConfigurationInfo>& v, const char* what) {
    CUpti_PCSamplingConfigurationInfoParams p;
    memset(&p, 0, sizeof p);
    p.size = CUpti_PCSamplingConfigurationInfoParamsSize;
    p.ctx = c.ctx;
    p.numAttributes = v.size();
    p.pPCSamplingConfigurationInfo = v.data();
    CUptiResult r = cuptiPCSamplingSetConfigurationAttribute(&p);
    if (r == CUPTI_SUCCESS) return true;
    logf("ERROR: cuptiPCSamplingSetConfigurationAttribute (%s) failed: %d (%s)", what, (int)r, cuptiErr(r));
    for (auto& x : v)
      if (x.attributeStatus != CUPTI_SUCCESS)
        logf("       attribute %s: %d (%s)", attrName((int)x.attributeType), (int)x.attributeStatus,
             cuptiErr(x.attributeStatus));
    return false;
  };
  std::vector<CUpti_PCSamplingConfigurationInfo> all = req;
  all.insert(all.end(), opt.begin(), opt.end());
  for (auto& x : all) x.attributeStatus = CUPTI_SUCCESS;
  if (!setAll(all, "all attributes")) {
    // retry without the optional attributes CUPTI flagged, then with the required ones only
    std::vector<CUpti_PCSamplingConfigurationInfo> retry = req;
    std::string dropped;
    for (size_t i = req.size(); i < all.size(); ++i) {
      if (all[i].attributeStatus == CUPTI_SUCCESS) retry.push_back(opt[i - req.size()]);
      else dropped += std::string(dropped.empty() ? "" : ", ") + attrName((int)all[i].attributeType);
    }
    for (auto& x : retry) x.attributeStatus = CUPTI_SUCCESS;
    if (!dropped.empty() && setAll(retry, "without the refused attributes")) {
      logf("WARNING: using CUPTI's defaults for %s (the requested values were refused)", dropped.c_str());
    } else {
      std::vector<CUpti_PCSamplingConfigurationInfo> only = req;
      if (opt.empty() || !setAll(only, "required attributes only")) return false;
      logf("WARNING: running with CUPTI's defaults for period/buffer sizes (the requested ones were refused)");
    }
  }
  c.configText = readConfig(c);
  return true;
}

void onContextCreated(CUcontext ctx) {
  if (g_ctxs.count(ctx)) return;
  Ctx* c = new Ctx();
  c->ctx = ctx;
  g_ctxs[ctx] = c;
  if (cuptiGetContextId(ctx, &c->uid) != CUPTI_SUCCESS) c->uid = (uint32_t)g_ctxs.size();
  if (cuptiGetDeviceId(ctx, &c->device) != CUPTI_SUCCESS) c->device = 0;
  if (g_cfg.disable) return;
  CUpti_PCSamplingEnableParams ep;
  memset(&ep, 0, sizeof ep);
  ep.size = CUpti_PCSamplingEnableParamsSize;
  ep.ctx = ctx;
  if (!ok(cuptiPCSamplingEnable(&ep), "cuptiPCSamplingEnable")) {
    logf("context %u: PC sampling NOT enabled; the program runs on unprofiled", c->uid);
    c->done = true;
    return;
  }
  if (!configure(*c)) {
    logf("context %u: PC sampling configuration failed; disabling it and carrying on unprofiled", c->uid);
    CUpti_PCSamplingDisableParams dp;
    memset(&dp, 0, sizeof dp);
    dp.size = CUpti_PCSamplingDisableParamsSize;
    dp.ctx = ctx;
    ok(cuptiPCSamplingDisable(&dp), "cuptiPCSamplingDisable");
    c->done = true;
    return;
  }
  c->enabled = true;
  logf("context %u (device %u): PC sampling enabled, %zu stall reasons; %s", c->uid, c->device, c->numReasons,
       c->configText.c_str());
}

void onContextDestroy(CUcontext ctx) {
  auto it = g_ctxs.find(ctx);
  if (it == g_ctxs.end()) return;
  Ctx* c = it->second;
  finishCtx(*c, "context-destroy");
  g_ctxs.erase(it);
  c->ctx = nullptr;
  g_deadCtxs.push_back(c);  // keep its reason names (and Buffer storage: CUPTI may still hold pointers)
  writeOutputs("context-destroy");
}

void onModuleLoaded(const CUpti_ResourceData* rd) {
  const CUpti_ModuleResourceData* md = (const CUpti_ModuleResourceData*)rd->resourceDescriptor;
  if (!md) {
    logf("WARNING: module-loaded callback without module data");
    return;
  }
  if (!md->pCubin || !md->cubinSize) {
    logf("WARNING: module %u loaded without a cubin image (size %zu)", md->moduleId, md->cubinSize);
  } else {
    CUpti_GetCubinCrcParams cp;
    memset(&cp, 0, sizeof cp);
    cp.size = CUpti_GetCubinCrcParamsSize;
    cp.cubinSize = md->cubinSize;
    cp.cubin = md->pCubin;
    if (ok(cuptiGetCubinCrc(&cp), "cuptiGetCubinCrc") && !g_modules.count(cp.cubinCrc)) {
      Module m;
      m.crc = cp.cubinCrc;
      m.moduleId = md->moduleId;
      m.size = md->cubinSize;
      const unsigned char* b = (const unsigned char*)md->pCubin;
      if (md->cubinSize >= 4 && b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F') m.kind = "elf";
      else if (md->cubinSize >= 4 && b[0] == 0x50 && b[1] == 0xed && b[2] == 0x55 && b[3] == 0xba) m.kind = "fatbin";
      else m.kind = "unknown";
      m.file = fmt("cubin_%016" PRIx64 ".cubin", m.crc);
      struct stat stbuf;
      std::string finalPath = g_cubinDir + "/" + m.file;
      if (stat(finalPath.c_str(), &stbuf) == 0 && (size_t)stbuf.st_size == md->cubinSize) {
        m.published = true;  // another process (or an earlier load) already put it there
      } else if (g_cfg.keepAllCubins) {
        m.published = writeFile(finalPath, std::string(md->pCubin, md->cubinSize));
      } else {
        if (g_spoolDir.empty()) {
          g_spoolDir = g_cubinDir + "/.cubins." + std::to_string(getpid());
          mkdirs(g_spoolDir);
        }
        m.spooled = writeFile(g_spoolDir + "/" + m.file, std::string(md->pCubin, md->cubinSize));
      }
      if (m.kind != "elf") logf("WARNING: module %u image is not an ELF cubin (%s)", md->moduleId, m.kind.c_str());
      if (g_cfg.verbose) logf("module %u: %zu bytes -> %s", md->moduleId, md->cubinSize, m.file.c_str());
      g_modules[m.crc] = m;
    }
  }
}

void onLaunchExit(const CUpti_CallbackData* cb) {
  g_st.launches++;
  if (cb->symbolName) g_launchesByName[cb->symbolName]++;
  auto it = g_ctxs.find(cb->context);
  if (it == g_ctxs.end()) return;
  Ctx& c = *it->second;
  c.launches++;
  if (!c.enabled || c.done || c.getDataErrors >= 50) return;
  // The configuration buffer fills at range ends (each kernel in serialized mode); a drain moves its
  // records out. Drain when it holds something, and every drainEvery launches regardless.
  const volatile size_t* tot = &c.cfgBuf.data.totalNumPcs;
  const volatile size_t* rem = &c.cfgBuf.data.remainingNumPcs;
  bool due = c.launches - c.lastDrainLaunch >= g_cfg.drainEvery;
  bool pending = *tot > 0 || (g_cfg.mode == CUPTI_PC_SAMPLING_COLLECTION_MODE_KERNEL_SERIALIZED
                                  ? *rem > 0
                                  : *rem >= c.cfgBuf.pcs.size() / 2);
  if (due || pending) drain(c, "launch");
  // intermediate output, so that a run that is killed (no exit handler) still leaves data
  if (g_cfg.flushSec > 0 && secs() - g_lastWrite >= g_cfg.flushSec) {
    for (auto& kv : g_ctxs) drain(*kv.second, "periodic");
    writeOutputs("periodic");
  }
}

void CUPTIAPI callback(void*, CUpti_CallbackDomain domain, CUpti_CallbackId cbid, const void* data) {
  if (!data) return;
  std::unique_lock<std::recursive_timed_mutex> lock(g_mu, std::defer_lock);
  if (!lock.try_lock_for(std::chrono::seconds(30))) {
    logf("WARNING: callback could not take the lock in 30 s; skipped");
    return;
  }
  if (g_finished) return;
  if (domain == CUPTI_CB_DOMAIN_RESOURCE) {
    const CUpti_ResourceData* rd = (const CUpti_ResourceData*)data;
    switch (cbid) {
      case CUPTI_CBID_RESOURCE_CONTEXT_CREATED: onContextCreated(rd->context); break;
      case CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING: onContextDestroy(rd->context); break;
      case CUPTI_CBID_RESOURCE_MODULE_LOADED:
        onModuleLoaded(rd);
        // flush what belongs to earlier modules (required in continuous mode after unload/load)
        if (g_ctxs.count(rd->context)) drain(*g_ctxs[rd->context], "module-load");
        break;
      case CUPTI_CBID_RESOURCE_MODULE_UNLOAD_STARTING:
        if (g_ctxs.count(rd->context)) drain(*g_ctxs[rd->context], "module-unload");
        break;
      default: break;
    }
  } else if (domain == CUPTI_CB_DOMAIN_DRIVER_API) {
    const CUpti_CallbackData* cb = (const CUpti_CallbackData*)data;
    if (cb->callbackSite == CUPTI_API_EXIT) onLaunchExit(cb);
  } else if (domain == CUPTI_CB_DOMAIN_STATE) {
    const CUpti_StateData* sd = (const CUpti_StateData*)data;
    logf("CUPTI %s: %d (%s) %s", cbid == CUPTI_CBID_STATE_FATAL_ERROR ? "FATAL ERROR" : "notice",
         (int)sd->notification.result, cuptiErr(sd->notification.result),
         sd->notification.message ? sd->notification.message : "");
    if (cbid == CUPTI_CBID_STATE_FATAL_ERROR) {
      // CUPTI finalizes itself after a fatal error: stop calling it, keep what we have.
      for (auto& kv : g_ctxs) kv.second->done = true;
      writeOutputs("cupti-fatal-error");
    }
  }
}

void atExit() {
  std::unique_lock<std::recursive_timed_mutex> lock(g_mu, std::defer_lock);
  if (!lock.try_lock_for(std::chrono::seconds(30))) {
    logf("ERROR: exit handler could not take the lock in 30 s; no final output written");
    return;
  }
  if (g_finished) return;
  for (auto& kv : g_ctxs) finishCtx(*kv.second, "exit");
  writeOutputs("exit", true);
  g_finished = true;
  if (g_getDataLog) {
    fclose(g_getDataLog);
    g_getDataLog = nullptr;
  }
}

void readEnv() {
  if (const char* v = envs("PCSAMP_OUT")) g_cfg.out = v;
  while (g_cfg.out.size() > 1 && g_cfg.out.back() == '/') g_cfg.out.pop_back();
  long long p = envll("PCSAMP_PERIOD", -1);
  if (p != -1 && (p < 5 || p > 31)) {
    fprintf(stderr, "[pcsamp] WARNING: PCSAMP_PERIOD=%lld outside 5..31; using CUPTI's default\n", p);
    p = -1;
  }
  g_cfg.period = (int)p;
  if (const char* m = envs("PCSAMP_MODE")) {
    if (!strcmp(m, "continuous")) g_cfg.mode = CUPTI_PC_SAMPLING_COLLECTION_MODE_CONTINUOUS;
    else if (strcmp(m, "serialized") && strcmp(m, "kernel-serialized"))
      fprintf(stderr, "[pcsamp] WARNING: PCSAMP_MODE=%s unknown; using serialized\n", m);
  }
  if (const char* k = envs("PCSAMP_KERNEL")) {
    std::string s = k;
    size_t pos = 0;
    while (pos <= s.size()) {
      size_t e = s.find(',', pos);
      if (e == std::string::npos) e = s.size();
      if (e > pos) g_cfg.kernels.push_back(s.substr(pos, e - pos));
      pos = e + 1;
    }
  }
  long long n = envll("PCSAMP_PCS", 10000);
  g_cfg.pcs = (size_t)std::max(100LL, std::min(n, 10000000LL));
  long long mb = envll("PCSAMP_SCRATCH_MB", 64);
  g_cfg.scratchBytes = mb > 0 ? (size_t)mb << 20 : 0;
  mb = envll("PCSAMP_HWBUF_MB", 0);
  g_cfg.hwbufBytes = mb > 0 ? (size_t)mb << 20 : 0;
  long long ms = envll("PCSAMP_SLEEP_MS", 0);
  g_cfg.sleepMs = ms > 0 ? (uint32_t)ms : 0;
  long long de = envll("PCSAMP_DRAIN_EVERY", 64);
  g_cfg.drainEvery = de > 0 ? (uint64_t)de : 64;
  g_cfg.verbose = envll("PCSAMP_VERBOSE", 0) != 0;
  g_cfg.disable = envll("PCSAMP_DISABLE", 0) != 0;
  g_cfg.keepAllCubins = envll("PCSAMP_KEEP_CUBINS", 0) != 0;
  g_cfg.flushSec = (double)envll("PCSAMP_FLUSH_SEC", 30);
}

}  // namespace

PCSAMP_EXPORT int InitializeInjection(void) {
  std::lock_guard<std::recursive_timed_mutex> lock(g_mu);
  if (g_initialized) return 1;
  g_initialized = true;
  g_t0 = std::chrono::steady_clock::now();
  readEnv();
  chooseOutDir();
  g_logFile = fopen((g_outDir + "/pcsamp.log").c_str(), "a");
  g_getDataLog = fopen((g_outDir + "/getdata.tsv").c_str(), "w");
  if (g_getDataLog)
    fprintf(g_getDataLog,
            "t_s\tctx\twhy\tresult\ttotalNumPcs\tremainingNumPcs\trangeId\ttotalSamples\tdroppedSamples\t"
            "nonUsrKernelsTotalSamples\thwBufferFull\tcfg_totalNumPcs\tcfg_remainingNumPcs\n");
  uint32_t ver = 0;
  cuptiGetVersion(&ver);
  logf("InitializeInjection: CUPTI API %u (built against %d); output %s; mode %s; period %s; kernel filter %s",
       ver, CUPTI_API_VERSION, g_outDir.c_str(),
       g_cfg.mode == CUPTI_PC_SAMPLING_COLLECTION_MODE_CONTINUOUS ? "continuous" : "serialized",
       g_cfg.period >= 0 ? std::to_string(g_cfg.period).c_str() : "CUPTI default",
       envs("PCSAMP_KERNEL") ? envs("PCSAMP_KERNEL") : "(none)");
  if (g_cfg.disable) {
    logf("PCSAMP_DISABLE is set: loaded, doing nothing");
    return 1;
  }

  char oldName[CUPTI_OLD_SUBSCRIBER_NAME_MIN_LEN + 8] = {0};
  CUpti_SubscriberParams sp;
  memset(&sp, 0, sizeof sp);
  sp.structSize = CUpti_SubscriberParams_STRUCT_SIZE;
  sp.subscriberName = "pcsamp";
  sp.oldSubscriberName = oldName;
  sp.oldSubscriberSize = sizeof oldName - 1;
  CUptiResult r = cuptiSubscribe_v2(&g_sub, (CUpti_CallbackFunc)callback, nullptr, &sp);
  if (r != CUPTI_SUCCESS) {
    ok(r, "cuptiSubscribe_v2");
    if (oldName[0]) logf("       existing subscriber: %s", oldName);
    logf("not sampling; the program runs unprofiled");
    return 1;  // returning 0 would not help the host program either
  }
  const CUpti_CallbackIdResource res[] = {CUPTI_CBID_RESOURCE_CONTEXT_CREATED,
                                          CUPTI_CBID_RESOURCE_CONTEXT_DESTROY_STARTING,
                                          CUPTI_CBID_RESOURCE_MODULE_LOADED,
                                          CUPTI_CBID_RESOURCE_MODULE_UNLOAD_STARTING};
  bool good = true;
  for (auto id : res) good &= ok(cuptiEnableCallback(1, g_sub, CUPTI_CB_DOMAIN_RESOURCE, id), "cuptiEnableCallback(resource)");
  if (!good) {
    logf("not sampling: resource callbacks unavailable");
    cuptiUnsubscribe(g_sub);
    return 1;
  }
  const CUpti_driver_api_trace_cbid launches[] = {
      CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel,          CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz,
      CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx,        CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx_ptsz,
      CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel, CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel_ptsz,
      CUPTI_DRIVER_TRACE_CBID_cuGraphLaunch,           CUPTI_DRIVER_TRACE_CBID_cuGraphLaunch_ptsz,
      CUPTI_DRIVER_TRACE_CBID_cuLaunch,                CUPTI_DRIVER_TRACE_CBID_cuLaunchGrid,
      CUPTI_DRIVER_TRACE_CBID_cuLaunchGridAsync};
  int enabled = 0;
  for (auto id : launches) {
    CUptiResult e = cuptiEnableCallback(1, g_sub, CUPTI_CB_DOMAIN_DRIVER_API, id);
    if (e == CUPTI_SUCCESS) enabled++;
    else if (g_cfg.verbose) logf("note: launch callback %d not available: %s", (int)id, cuptiErr(e));
  }
  if (!enabled) logf("WARNING: no launch callback could be enabled; data is read at module loads and exit only");
  // fatal-error notifications (optional)
  cuptiEnableCallback(1, g_sub, CUPTI_CB_DOMAIN_STATE, CUPTI_CBID_STATE_FATAL_ERROR);
  // registered after CUPTI's own initialization, so that it runs before CUPTI's exit-time teardown
  if (atexit(atExit) != 0) logf("WARNING: atexit failed; data is written only when contexts are destroyed");
  logf("subscribed: resource callbacks + %d launch callbacks", enabled);
  return 1;
}
