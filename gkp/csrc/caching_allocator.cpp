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
// uses); a pointer this allocator did not hand out (allocated before it was installed and
// released through raw_deallocate) goes to c10::free_cpu, as the default allocator would.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct CachingCPUAllocator final : c10::Allocator {
  std::mutex mutex;
  std::unordered_map<void*, size_t> live;                 // handed out: size
  std::unordered_map<size_t, std::vector<void*>> kept;    // freed and kept, by size
  size_t kept_bytes = 0, limit = 0;
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
      auto it = kept.find(n);
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
        if (kept_bytes + n <= limit) {
          kept[n].push_back(p);
          kept_bytes += n;
          return;
        }
      }
    }
    c10::free_cpu(p);
  }

  // Free every kept block (live ones stay handed out).
  void clear() {
    std::vector<void*> out;
    {
      std::lock_guard<std::mutex> guard(mutex);
      for (auto& [n, blocks] : kept) out.insert(out.end(), blocks.begin(), blocks.end());
      kept.clear();
      kept_bytes = 0;
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

// Make it PyTorch's CPU allocator (once; a later call only changes the limit). Returns 1 when it
// is the allocator new CPU tensors come from.
int64_t install(int64_t limit_bytes) {
  TORCH_CHECK(limit_bytes >= 0, "gkp_memory: the limit must be >= 0 bytes");
  auto* a = instance();
  {
    std::lock_guard<std::mutex> guard(a->mutex);
    a->limit = static_cast<size_t>(limit_bytes);
  }
  if (c10::GetCPUAllocator() != a) c10::SetCPUAllocator(a, /*priority=*/100);
  return c10::GetCPUAllocator() == a ? 1 : 0;
}

// Hand new CPU tensors to PyTorch's default allocator again and free the kept blocks; blocks
// still handed out come back through this allocator's deleter and are freed then.
int64_t uninstall() {
  auto* a = instance();
  {
    std::lock_guard<std::mutex> guard(a->mutex);
    a->limit = 0;
  }
  a->clear();
  if (c10::GetCPUAllocator() == a) c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), 100);
  return c10::GetCPUAllocator() == a ? 0 : 1;
}

// [installed, kept bytes, limit, hits, misses, blocks handed out]
std::vector<int64_t> stats() {
  auto* a = instance();
  std::lock_guard<std::mutex> guard(a->mutex);
  return {c10::GetCPUAllocator() == a ? 1 : 0, static_cast<int64_t>(a->kept_bytes),
          static_cast<int64_t>(a->limit), a->hits, a->misses,
          static_cast<int64_t>(a->live.size())};
}

int64_t clear() {
  instance()->clear();
  return 0;
}

}  // namespace

TORCH_LIBRARY(gkp_memory, m) {
  m.def("install(int limit_bytes) -> int", &install);
  m.def("uninstall() -> int", &uninstall);
  m.def("stats() -> int[]", &stats);
  m.def("clear() -> int", &clear);
}
