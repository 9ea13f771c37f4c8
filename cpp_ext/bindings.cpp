// pybind11 bindings of the SPSC rings: AudioRing (float32 samples) and TokenRing (int32 tokens), and of the
// native llama.cpp eval callback (EvalCapture, eval_capture.hpp).
//
// Arrays cross through the buffer protocol without copies or conversion: a 1-D C-contiguous buffer of
// exactly the ring's dtype, or a clear TypeError / ValueError.
// GIL: every call releases it while it waits (the wait guard) and for copies above kReleaseGilAbove
// samples. Smaller copies keep it: a 10 ms block copies in ~0.1 us, while handing the GIL to a waiting
// thread and taking it back costs microseconds and halved the throughput in bench/ring_buffer.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "eval_capture.hpp"
#include "spsc_ring.hpp"

namespace py = pybind11;

namespace {

constexpr size_t kReleaseGilAbove = 1 << 15;  // samples; below this a copy is cheaper than a GIL hand-off

template <typename T>
struct ElementInfo;
template <>
struct ElementInfo<float> {
  static constexpr char kFormat = 'f';
  static constexpr const char* kName = "float32";
};
template <>
struct ElementInfo<int32_t> {
  static constexpr char kFormat = 'i';
  static constexpr const char* kName = "int32";
};

template <typename T>
struct View {
  py::buffer_info info;
  T* data() const { return static_cast<T*>(info.ptr); }
  size_t size() const { return static_cast<size_t>(info.size); }
};

// A zero-copy view of `obj`, or a TypeError/ValueError that says what was expected.
template <typename T>
View<T> as_view(const py::buffer& obj, bool writable, const char* arg) {
  py::buffer_info info;
  try {
    info = obj.request(writable);
  } catch (py::error_already_set& e) {
    if (writable) throw py::value_error(std::string(arg) + " must be a writable array (got a read-only buffer)");
    throw;
  }
  const std::string& fmt = info.format;
  const bool little = fmt.size() == 1 || (fmt.size() == 2 && (fmt[0] == '<' || fmt[0] == '=' || fmt[0] == '@'));
  char code = fmt.empty() ? '?' : fmt.back();
  if (code == 'l' && sizeof(long) == 4) code = 'i';
  if (!little || code != ElementInfo<T>::kFormat || info.itemsize != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::type_error(std::string(arg) + " must have dtype " + ElementInfo<T>::kName + " (buffer format '" + fmt +
                         "', " + std::to_string(info.itemsize) + "-byte items); convert it once outside the hot path");
  }
  if (info.ndim != 1) {
    throw py::value_error(std::string(arg) + " must be 1-D, got " + std::to_string(info.ndim) +
                          " dimensions (use .reshape(-1) on a contiguous array)");
  }
  if (info.size > 1 && info.strides[0] != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::value_error(std::string(arg) + " must be C-contiguous (stride " + std::to_string(info.strides[0]) +
                          " bytes, expected " + std::to_string(sizeof(T)) + ")");
  }
  return View<T>{std::move(info)};
}

kimia::OverflowPolicy parse_policy(const std::string& name) {
  if (name == "block") return kimia::OverflowPolicy::Block;
  if (name == "drop_oldest") return kimia::OverflowPolicy::DropOldest;
  if (name == "raise") return kimia::OverflowPolicy::Raise;
  throw py::value_error("policy must be 'block', 'drop_oldest' or 'raise', got '" + name + "'");
}

const char* policy_name(kimia::OverflowPolicy p) {
  switch (p) {
    case kimia::OverflowPolicy::Block:
      return "block";
    case kimia::OverflowPolicy::DropOldest:
      return "drop_oldest";
    case kimia::OverflowPolicy::Raise:
      return "raise";
  }
  return "?";
}

double timeout_arg(const py::object& timeout) {
  if (timeout.is_none()) return -1.0;
  const double t = timeout.cast<double>();
  if (std::isnan(t)) throw py::value_error("timeout must be a number of seconds >= 0 or None (wait forever), got NaN");
  if (t < 0) throw py::value_error("timeout must be >= 0 seconds or None (wait forever)");
  if (std::isinf(t)) return -1.0;  // inf = forever, like None
  return t;
}

template <typename T>
void bind_ring(py::module_& m, const char* name, const char* doc) {
  using Ring = kimia::SpscRing<T>;
  py::class_<Ring>(m, name, doc)
      .def(py::init([](size_t capacity, const std::string& policy) {
             return new Ring(capacity, parse_policy(policy));
           }),
           py::arg("capacity"), py::arg("policy") = "block",
           "capacity: size in elements. policy: 'block' (writers wait for space), 'drop_oldest' (writers "
           "overwrite the oldest unread data), 'raise' (a write that does not fit raises RingFullError).")
      .def(
          "write",
          [](Ring& r, const py::buffer& data, const py::object& timeout) {
            auto side = r.producer_scope();
            auto v = as_view<T>(data, false, "data");
            const double t = timeout_arg(timeout);
            if (v.size() > kReleaseGilAbove) {
              py::gil_scoped_release nogil;
              return r.write(v.data(), v.size(), t);
            }
            return r.template write<py::gil_scoped_release>(v.data(), v.size(), t);
          },
          py::arg("data"), py::arg("timeout") = py::none(),
          "Writes all of `data`, waiting for space under the 'block' policy (GIL released while waiting). "
          "Returns the number of elements written: fewer than len(data) only if `timeout` (seconds) expired.")
      .def(
          "write_nowait",
          [](Ring& r, const py::buffer& data) {
            auto side = r.producer_scope();
            auto v = as_view<T>(data, false, "data");
            if (v.size() > kReleaseGilAbove) {
              py::gil_scoped_release nogil;
              return r.write_nowait(v.data(), v.size());
            }
            return r.write_nowait(v.data(), v.size());
          },
          py::arg("data"),
          "Never waits. 'block': writes what fits now; 'drop_oldest': writes everything; 'raise': writes "
          "everything or raises RingFullError. Returns the number of elements written.")
      .def(
          "read_into",
          [](Ring& r, const py::buffer& out, const py::object& timeout) {
            auto side = r.consumer_scope();
            auto v = as_view<T>(out, true, "out");
            const double t = timeout_arg(timeout);
            if (v.size() > kReleaseGilAbove) {
              py::gil_scoped_release nogil;
              return r.read(v.data(), v.size(), t);
            }
            return r.template read<py::gil_scoped_release>(v.data(), v.size(), t);
          },
          py::arg("out"), py::arg("timeout") = py::none(),
          "Fills `out`, waiting for data (GIL released). Returns the number of elements read: fewer than "
          "len(out) at end of stream (closed and drained) or when `timeout` expired.")
      .def(
          "read_into_nowait",
          [](Ring& r, const py::buffer& out, bool pad_silence) {
            auto side = r.consumer_scope();
            auto v = as_view<T>(out, true, "out");
            if (v.size() > kReleaseGilAbove) {
              py::gil_scoped_release nogil;
              return r.read_nowait(v.data(), v.size(), pad_silence);
            }
            return r.read_nowait(v.data(), v.size(), pad_silence);
          },
          py::arg("out"), py::arg("pad_silence") = false,
          "Never waits or allocates: copies what is there into `out`, zero-fills the rest if `pad_silence` "
          "(for a sound-device callback), and counts an underrun if it came up short. Returns elements read.")
      .def(
          "read",
          [](Ring& r, size_t n, const py::object& timeout) {
            auto side = r.consumer_scope();
            py::array_t<T> out(static_cast<py::ssize_t>(n));
            const double t = timeout_arg(timeout);
            size_t got;
            if (n > kReleaseGilAbove) {
              py::gil_scoped_release nogil;
              got = r.read(out.mutable_data(), n, t);
            } else {
              got = r.template read<py::gil_scoped_release>(out.mutable_data(), n, t);
            }
            return got == n ? out : py::array_t<T>(out[py::slice(0, static_cast<py::ssize_t>(got), 1)]);
          },
          py::arg("n"), py::arg("timeout") = py::none(),
          "Reads n elements into a new array, waiting for data; shorter at end of stream or on timeout.")
      .def(
          "read_nowait",
          [](Ring& r, size_t n) {
            auto side = r.consumer_scope();
            py::array_t<T> out(static_cast<py::ssize_t>(n));
            const size_t got = r.read_nowait(out.mutable_data(), n, false);
            return got == n ? out : py::array_t<T>(out[py::slice(0, static_cast<py::ssize_t>(got), 1)]);
          },
          py::arg("n"), "Reads up to n elements that are there now into a new array; never waits.")
      .def(
          "wait_readable",
          [](Ring& r, size_t n, const py::object& timeout) {
            auto side = r.consumer_scope();
            const double t = timeout_arg(timeout);
            return r.template wait_readable<py::gil_scoped_release>(n, t);
          },
          py::arg("n") = 1, py::arg("timeout") = py::none(),
          "Waits (GIL released) until n elements can be read, the ring is closed, or `timeout` expires; reads "
          "and counts nothing. Returns True if the n elements are there.")
      .def("clear", [](Ring& r) { auto side = r.consumer_scope(); r.clear(); },
           "Discards everything buffered (call from the reader, or with no reader running).")
      .def("close", &Ring::close, py::call_guard<py::gil_scoped_release>(),
           "Ends the stream: later writes raise RingClosedError; waiting readers and writers wake up; "
           "readers drain what is left, then get short reads (end of stream).")
      .def_property_readonly("capacity", &Ring::capacity)
      .def_property_readonly("policy", [](const Ring& r) { return policy_name(r.policy()); })
      .def_property_readonly("closed", &Ring::closed)
      .def_property_readonly("available", &Ring::available, "Elements a reader can take now.")
      .def_property_readonly("free", &Ring::free_space, "Elements a writer can add now without waiting or dropping.")
      .def(
          "stats",
          [](const Ring& r) {
            const kimia::RingStats s = r.stats();
            py::dict d;
            d["total_written"] = s.total_written;
            d["total_read"] = s.total_read;
            d["dropped"] = s.dropped;
            d["overruns"] = s.overruns;
            d["underruns"] = s.underruns;
            d["high_water"] = s.high_water;
            return d;
          },
          "Counters: total_written, total_read, dropped (samples overwritten unread), overruns (writes that met "
          "a full ring), underruns (reads that came up short on an open ring), high_water (largest fill).")
      .def("__len__", &Ring::available)
      .def("__repr__", [name](const Ring& r) {
        return std::string(name) + "(capacity=" + std::to_string(r.capacity()) + ", policy='" +
               policy_name(r.policy()) + "', available=" + std::to_string(r.available()) +
               (r.closed() ? ", closed" : "") + ")";
      });
}

void bind_eval_capture(py::module_& m) {
  using kimia::EvalCapture;
  py::class_<EvalCapture>(m, "EvalCapture",
                          "llama.cpp eval callback in C++: copies the graph tensor `name` ([rows, width] float32) "
                          "into a preallocated buffer of capacity_rows rows; every other node returns at once.")
      .def(py::init([](const std::string& name, size_t width, size_t capacity_rows, uintptr_t get_name,
                       uintptr_t nelements, uintptr_t nbytes, uintptr_t tensor_get) {
             if (width == 0 || capacity_rows == 0) throw py::value_error("width and capacity_rows must be > 0");
             if (!get_name || !nelements || !nbytes || !tensor_get)
               throw py::value_error("the four libggml-base function addresses must be non-zero");
             kimia::GgmlTensorApi api;
             api.get_name = reinterpret_cast<kimia::GgmlTensorApi::GetName>(get_name);
             api.nelements = reinterpret_cast<kimia::GgmlTensorApi::NElements>(nelements);
             api.nbytes = reinterpret_cast<kimia::GgmlTensorApi::NBytes>(nbytes);
             api.tensor_get = reinterpret_cast<kimia::GgmlTensorApi::TensorGet>(tensor_get);
             return new EvalCapture(name, width, capacity_rows, api);
           }),
           py::arg("name"), py::arg("width"), py::arg("capacity_rows"), py::arg("ggml_get_name"),
           py::arg("ggml_nelements"), py::arg("ggml_nbytes"), py::arg("ggml_backend_tensor_get"),
           "The four addresses: the libggml-base functions of the library llama.cpp runs with (ctypes).")
      .def_property_readonly_static(
          "callback_address",
          [](py::object) { return reinterpret_cast<uintptr_t>(&EvalCapture::callback); },
          "Address of `bool cb(ggml_tensor*, bool ask, void* user_data)` for llama_context_params.cb_eval.")
      .def_property_readonly(
          "user_data", [](EvalCapture& c) { return reinterpret_cast<uintptr_t>(&c); },
          "Address for llama_context_params.cb_eval_user_data (valid while this object lives).")
      .def_property_readonly(
          "buffer",
          [](py::object self) {
            EvalCapture& c = self.cast<EvalCapture&>();
            return py::array_t<float>({static_cast<py::ssize_t>(c.capacity_rows()), static_cast<py::ssize_t>(c.width())},
                                      c.data(), self);
          },
          "[capacity_rows, width] float32 view of the buffer (no copy; keeps the capture alive).")
      .def_property_readonly("rows", &EvalCapture::rows, "Rows captured since the last reset().")
      .def_property_readonly("width", &EvalCapture::width)
      .def_property_readonly("capacity_rows", &EvalCapture::capacity_rows)
      .def_property_readonly("name", &EvalCapture::name)
      .def_property_readonly(
          "error", [](const EvalCapture& c) -> py::object {
            if (c.error().empty()) return py::none();
            return py::str(c.error());
          },
          "None, or why a capture was refused (wrong dtype/shape, buffer full) since the last reset().")
      .def("reset", &EvalCapture::reset, "Forgets the captured rows and any error.");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kimia-edge native code: lock-free single-producer single-consumer rings, the llama.cpp eval capture.";
  py::register_exception<kimia::RingClosed>(m, "RingClosedError", PyExc_RuntimeError);
  py::register_exception<kimia::RingFull>(m, "RingFullError", PyExc_BufferError);
  bind_ring<float>(m, "AudioRing", "SPSC ring of float32 audio samples.");
  bind_ring<int32_t>(m, "TokenRing", "SPSC ring of int32 token ids.");
  bind_eval_capture(m);
}
