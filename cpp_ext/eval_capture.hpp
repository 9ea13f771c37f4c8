// Native llama.cpp eval callback: copies one named graph tensor (e.g. "l_out-21") into a preallocated float32
// buffer and returns at once for every other node, so that no Python runs per graph node.
//
// llama.cpp calls `cb_eval(struct ggml_tensor * t, bool ask, void * user_data)` (ggml_backend_sched_eval_callback)
// for every node of every graph: first with ask=true ("do you want this node's data?"), then with ask=false for
// the nodes that answered true, once their data is computed. The tensor is read only through four libggml-base
// functions whose addresses the Python side takes from the same library llama-cpp-python loaded
// (ggml_get_name, ggml_nelements, ggml_nbytes, ggml_backend_tensor_get): the same ABI surface the Python callback
// uses and that the llama-cpp-python pin covers; no ggml struct layout is mirrored here. ggml_backend_tensor_get
// copies from any backend buffer (host memcpy on the CPU; device -> host on a GPU: untested on GPU).
//
// Threading: llama.cpp calls the callback on the thread that runs llama_decode, synchronously; the owner reads
// the buffer only after llama_decode returned, so no atomics are needed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kimia {

struct GgmlTensorApi {
  using GetName = const char* (*)(const void*);
  using NElements = int64_t (*)(const void*);
  using NBytes = size_t (*)(const void*);
  using TensorGet = void (*)(const void*, void*, size_t, size_t);
  GetName get_name = nullptr;
  NElements nelements = nullptr;
  NBytes nbytes = nullptr;
  TensorGet tensor_get = nullptr;
};

class EvalCapture {
 public:
  EvalCapture(std::string name, size_t width, size_t capacity_rows, GgmlTensorApi api)
      : name_(std::move(name)), width_(width), capacity_rows_(capacity_rows), api_(api),
        buffer_(width * capacity_rows) {}

  // The callback llama.cpp calls (its address goes into llama_context_params.cb_eval, `this` into
  // cb_eval_user_data). Non-matching nodes cost one call to ggml_get_name and one strcmp.
  static bool callback(void* tensor, bool ask, void* user_data) noexcept {
    auto* self = static_cast<EvalCapture*>(user_data);
    const char* name = self->api_.get_name(tensor);
    if (name == nullptr || std::strcmp(name, self->name_.c_str()) != 0) return !ask;  // ask: no; data: go on
    if (ask) return true;
    self->copy(tensor);
    return true;  // never abort the graph: errors are reported to the owner after llama_decode
  }

  size_t rows() const { return rows_; }
  size_t width() const { return width_; }
  size_t capacity_rows() const { return capacity_rows_; }
  const std::string& name() const { return name_; }
  const std::string& error() const { return error_; }
  float* data() { return buffer_.data(); }
  void reset() {
    rows_ = 0;
    error_.clear();
  }

 private:
  void copy(const void* tensor) noexcept {
    if (!error_.empty()) return;
    const int64_t n = api_.nelements(tensor);
    const size_t nbytes = api_.nbytes(tensor);
    if (n < 0 || nbytes != 4 * static_cast<size_t>(n) || static_cast<size_t>(n) % width_ != 0) {
      error_ = name_ + ": expected float32 [*, " + std::to_string(width_) + "], got " + std::to_string(nbytes) +
               " bytes / " + std::to_string(n) + " elements";
      return;
    }
    const size_t rows = static_cast<size_t>(n) / width_;
    if (rows_ + rows > capacity_rows_) {
      error_ = name_ + ": " + std::to_string(rows_ + rows) + " rows captured before they were read, buffer holds " +
               std::to_string(capacity_rows_);
      return;
    }
    api_.tensor_get(tensor, buffer_.data() + rows_ * width_, 0, nbytes);
    rows_ += rows;
  }

  std::string name_;
  size_t width_;
  size_t capacity_rows_;
  GgmlTensorApi api_;
  std::vector<float> buffer_;
  size_t rows_ = 0;
  std::string error_;
};

}  // namespace kimia
