#include "transport/hbone/pipe_pair.h"

namespace weft {

PipePair::Ends PipePair::make(const TunnelPipe::executor_type& ex) {
  auto pair = std::make_shared<PipePair>(ex);
  return {std::shared_ptr<TunnelPipe>(pair, &pair->pipes_[0]),
          std::shared_ptr<TunnelPipe>(pair, &pair->pipes_[1])};
}

PipePair::PipePair(const TunnelPipe::executor_type& ex) : pipes_{TunnelPipe(ex), TunnelPipe(ex)} {
  pipes_[0].attach(&ends_[0]);
  pipes_[1].attach(&ends_[1]);
}

void PipePair::move(int from) {
  // A nested call (the reader consumed while we pushed) is covered by the loop below.
  if (moving_[from]) return;
  moving_[from] = true;
  TunnelPipe& src = pipes_[from];
  TunnelPipe& dst = pipes_[1 - from];
  while (dst.is_open() && dst.buffered().size() < TunnelPipe::kOutCapacity) {
    if (src.transfer_to(dst, TunnelPipe::kOutCapacity - dst.buffered().size()) == 0) break;
  }
  moving_[from] = false;
  if (!src.output_ended() || eof_sent_[from]) return;
  eof_sent_[from] = true;
  dst.push_eof();
  // The closed end's last bytes are through: the other end's writes now fail (EPIPE).
  if (closing_[from]) dst.tunnel_finished(true);
}

void PipePair::closed(int index, bool unread) {
  if (unread) return pipes_[1 - index].tunnel_finished(false);  // as a reset
  closing_[index] = true;
  move(index);
}

}  // namespace weft
