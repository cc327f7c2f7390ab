// The nghttp2 options every HTTP/2 session of ours is made with (HBONE, the L7 downstream and
// upstream sides). The caller frees them with nghttp2_option_del once the session exists.
#pragma once

#include <nghttp2/nghttp2.h>

namespace weft {

inline nghttp2_option* new_h2_options() {
  nghttp2_option* opt = nullptr;
  nghttp2_option_new(&opt);
  // WINDOW_UPDATE goes out only once received bytes were passed on: that is the backpressure.
  nghttp2_option_set_no_auto_window_update(opt, 1);
  // No closed streams kept for RFC 7540's priority tree (deprecated by RFC 9113), which every
  // session also turns off by sending kNoRfc7540Priorities: less work per stream.
  nghttp2_option_set_no_closed_streams(opt, 1);
  return opt;
}

inline constexpr nghttp2_settings_entry kNoRfc7540Priorities{NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES,
                                                             1};

}  // namespace weft
