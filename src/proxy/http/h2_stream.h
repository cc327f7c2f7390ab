// A downstream HTTP/2 stream: shared by H2Downstream (the connection, and the HTTP/1.1 bridge
// to an HttpSession) and H2Forward (a stream forwarded as HTTP/2).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/parser.hpp>

#include "proxy/http/h2_downstream.h"
#include "proxy/http/h2_upstream.h"

namespace weft {

class H2Forward;

struct H2Downstream::Stream {
  explicit Stream(int32_t stream_id) : id(stream_id) {}
  int32_t id;
  // The request, as it arrives.
  std::string method, authority, path, cookie;
  H2Fields fields;            // without pseudo-headers and cookies
  H2Fields request_trailers;  // after the body; passed on only to HTTP/2 services
  size_t header_bytes = 0;
  bool has_length = false;
  bool head_done = false;
  bool chunked = false;
  // Our end of the PipePair whose other end an HttpSession reads (the HTTP/1.1 bridge).
  std::unique_ptr<ByteStream> bridge;
  std::string to_bridge, writing_now;
  size_t data_pending = 0, data_writing = 0;  // request DATA bytes not yet credited back
  bool writing = false;
  bool request_done = false;
  // The response. Read from the bridge (HTTP/1.1) into `rd`, made only for a bridged stream:
  // a stream forwarded as HTTP/2 has no use for its 16 KiB.
  struct BridgeResponse {
    boost::beast::flat_buffer buffer;
    boost::beast::http::response_parser<boost::beast::http::buffer_body> parser;
    char chunk[16 * 1024];
  };
  std::unique_ptr<BridgeResponse> rd;
  std::vector<std::string> head;  // name, value, name, value, ... (kept for nghttp2)
  std::string body;
  size_t body_off = 0;
  bool reading = false;
  bool response_done = false;
  bool closed = false;
  // Set when the stream is forwarded as an HTTP/2 stream (no bridge, no HttpSession).
  std::shared_ptr<H2Forward> forward;
  H2Fields trailers;  // the response's, sent after its body
};

}  // namespace weft
