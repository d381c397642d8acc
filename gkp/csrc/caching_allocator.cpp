// A CPU allocator for PyTorch that keeps freed blocks and hands them out again, by exact size.
//
// PyTorch's default CPU allocator gives every freed tensor back to malloc, and glibc's malloc
// returns large blocks to the system (munmap, heap trimming), so every forward pass maps its
// activations again and page-faults each 4 KiB page of them in. Inference repeats the same sizes
// call after call, so keeping freed blocks by size removes those faults (and the malloc work):
// what the allocators deployments preload for PyTorch (jemalloc, tcmalloc) and the runtimes'
// arenas (ONNX Runtime, OpenVINO) do. gkp/memory.py installs it (gkp_memory::install).
//
// Blocks come from c10::alloc_cpu (64-byte aligned, as the default allocator's) and are released
// with c10::free_cpu. A freed block is kept while the kept bytes stay under the limit, otherwise
// freed at once; a request takes a kept block of exactly its size, else a new one. The data
// pointer is the context (raw_allocate / raw_deallocate work, which oneDNN's ideep allocator
// calls through c10::GetAllocator on every allocation and free); a pointer this allocator did not
// hand out (allocated before it was installed and released through raw_deallocate) goes to
// c10::free_cpu, as the default allocator would. Once installed it stays PyTorch's CPU allocator
// for the life of the process: "uninstall" only stops the caching (every block then goes straight
// back to free_cpu), so every raw allocation and free keeps passing through this one object and
// its table of blocks handed out stays exact (giving the slot back would let a block allocated
// here be freed elsewhere, and its address, reused by malloc, be cached under a stale size).
// Not reported to PyTorch's memory profiler; reused blocks skip c10's debug zero/junk fills.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <pthread.h>

#include <cstdint>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct CachingCPUAllocator final : c10::Allocator {
  std::mutex mutex;
  std::unordered_map<void*, size_t> live;                 // handed out: size
  std::unordered_map<size_t, std::vector<void*>> kept;    // freed and kept, by size
  size_t kept_bytes = 0, limit = 0;
  bool caching = false;
  int64_t hits = 0, misses = 0;

  c10::DataPtr allocate(size_t n) override {
    void* p = take(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void* take(size_t n) {
    if (n == 0) return nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex);
      auto it = caching ? kept.find(n) : kept.end();
      if (it != kept.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        kept_bytes -= n;
        ++hits;
        live[p] = n;
        return p;
      }
      ++misses;
    }
    void* p = c10::alloc_cpu(n);
    std::lock_guard<std::mutex> guard(mutex);
    live[p] = n;
    return p;
  }

  void give(void* p) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::mutex> guard(mutex);
      auto it = live.find(p);
      if (it != live.end()) {
        const size_t n = it->second;
        live.erase(it);
        if (caching && kept_bytes + n <= limit) {
          kept[n].push_back(p);
          kept_bytes += n;
          return;
        }
      }
    }
    c10::free_cpu(p);
  }

  // Free kept blocks until at most `keep` bytes stay kept (0: all; live ones stay handed out).
  void trim(size_t keep) {
    std::vector<void*> out;
    {
      std::lock_guard<std::mutex> guard(mutex);
      for (auto it = kept.begin(); it != kept.end() && kept_bytes > keep;) {
        auto& blocks = it->second;
        while (!blocks.empty() && kept_bytes > keep) {
          out.push_back(blocks.back());
          blocks.pop_back();
          kept_bytes -= it->first;
        }
        it = blocks.empty() ? kept.erase(it) : std::next(it);
      }
    }
    for (void* p : out) c10::free_cpu(p);
  }

  static void release(void* p);
};

// Never destroyed: tensors handed out may outlive every static destructor.
CachingCPUAllocator* instance() {
  static auto* a = new CachingCPUAllocator();
  return a;
}

void CachingCPUAllocator::release(void* p) { instance()->give(p); }

// A child forked while another thread held the mutex (a DataLoader worker, say) would find it
// locked forever: hold it across fork() and release it on both sides.
void before_fork() { instance()->mutex.lock(); }
void after_fork() { instance()->mutex.unlock(); }

// Make it PyTorch's CPU allocator (the first call; SetCPUAllocator is not thread-safe, so call it
// while no other thread allocates) and cache with this limit; a lower limit frees kept blocks
// down to it. Returns 1 when new CPU tensors come from it, caching.
int64_t install(int64_t limit_bytes) {
  TORCH_CHECK(limit_bytes >= 0, "gkp_memory: the limit must be >= 0 bytes");
  auto* a = instance();
  if (c10::GetCPUAllocator() != a) {
    static const bool hooked = pthread_atfork(before_fork, after_fork, after_fork) == 0;
    (void)hooked;
    c10::SetCPUAllocator(a, /*priority=*/100);
  }
  {
    std::lock_guard<std::mutex> guard(a->mutex);
    a->limit = static_cast<size_t>(limit_bytes);
    a->caching = c10::GetCPUAllocator() == a;
  }
  a->trim(static_cast<size_t>(limit_bytes));
  return a->caching ? 1 : 0;
}

// Stop caching: kept blocks are freed, and every block from now on goes straight back to
// c10::free_cpu, as with PyTorch's default allocator (the allocator stays installed, see above).
int64_t uninstall() {
  auto* a = instance();
  {
    std::lock_guard<std::mutex> guard(a->mutex);
    a->caching = false;
  }
  a->trim(0);
  return 1;
}

// [caching, kept bytes, limit, hits, misses, blocks handed out]
std::vector<int64_t> stats() {
  auto* a = instance();
  std::lock_guard<std::mutex> guard(a->mutex);
  const bool on = a->caching && c10::GetCPUAllocator() == a;
  return {on ? 1 : 0, static_cast<int64_t>(a->kept_bytes), static_cast<int64_t>(a->limit),
          a->hits, a->misses, static_cast<int64_t>(a->live.size())};
}

int64_t clear() {
  instance()->trim(0);
  return 0;
}

}  // namespace

TORCH_LIBRARY(gkp_memory, m) {
  m.def("install(int limit_bytes) -> int", &install);
  m.def("uninstall() -> int", &uninstall);
  m.def("stats() -> int[]", &stats);
  m.def("clear() -> int", &clear);
}
