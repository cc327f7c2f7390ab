// PipePair: two TunnelPipes joined back to back, an in-process socket pair. The HTTP/2 listener
// hands each request stream to an HttpSession over one (the HTTP/1.1 bridge) without the
// kernel: what one end writes the other reads, with a stream socket's backpressure (at most
// TunnelPipe::kOutCapacity waiting unread) and close semantics (EOF after the written bytes;
// a reset when the closing end left bytes unread).
#pragma once

#include <memory>
#include <utility>

#include "transport/hbone/tunnel_pipe.h"

namespace weft {

class PipePair {
 public:
  using Ends = std::pair<std::shared_ptr<TunnelPipe>, std::shared_ptr<TunnelPipe>>;
  // Both ends share the pair's lifetime: it lives while either end is held.
  static Ends make(const TunnelPipe::executor_type& ex);

  explicit PipePair(const TunnelPipe::executor_type& ex);
  PipePair(const PipePair&) = delete;
  PipePair& operator=(const PipePair&) = delete;

 private:
  struct End final : TunnelPipeSink {
    End(PipePair* p, int i) : pair(p), index(i) {}
    void pipe_has_output() override { pair->move(index); }
    void pipe_consumed(size_t) override { pair->move(1 - index); }
    void pipe_closed(bool unread) override { pair->closed(index, unread); }
    PipePair* pair;
    int index;
  };

  void move(int from);
  void closed(int index, bool unread);

  TunnelPipe pipes_[2];
  End ends_[2]{{this, 0}, {this, 1}};
  bool moving_[2] = {false, false};
  bool closing_[2] = {false, false};
  bool eof_sent_[2] = {false, false};
};

}  // namespace weft
