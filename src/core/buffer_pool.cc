#include "core/buffer_pool.h"

namespace weft {

BufferPool& BufferPool::local() {
  thread_local BufferPool pool;
  return pool;
}

BufferPool::Buffer BufferPool::take() {
  if (free_.empty()) return Buffer(new uint8_t[kBufferSize]);
  uint8_t* p = free_.back();
  free_.pop_back();
  return Buffer(p);
}

void BufferPool::give_back(uint8_t* p) {
  if (free_.size() < kMaxFree)
    free_.push_back(p);
  else
    delete[] p;
}

void BufferPool::Deleter::operator()(uint8_t* p) const { BufferPool::local().give_back(p); }

BufferPool::~BufferPool() {
  for (auto* p : free_) delete[] p;
}

}  // namespace weft
