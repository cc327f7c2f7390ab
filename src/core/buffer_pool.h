// Per-thread pool of fixed-size I/O buffers. A connection takes a buffer only while bytes are in
// flight and gives it back when idle, so an idle connection holds no buffer at all (the memory
// per idle connection target) and a busy worker does not hit malloc per read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace weft {

class BufferPool {
 public:
  static constexpr size_t kBufferSize = 64 * 1024;
  static constexpr size_t kMaxFree = 32;  // 2 MiB kept per worker after a burst

  struct Deleter {
    void operator()(uint8_t* p) const;
  };
  using Buffer = std::unique_ptr<uint8_t[], Deleter>;

  // The calling thread's pool. Buffers must be returned on the thread that took them, which
  // holds because a connection never changes worker.
  static BufferPool& local();

  Buffer take();

 private:
  friend struct Deleter;
  void give_back(uint8_t* p);
  std::vector<uint8_t*> free_;

 public:
  ~BufferPool();
};

}  // namespace weft
