// The eager fast path's autograd Function in C++ (tritonbn/glue.py builds this file on demand).
//
// A Python autograd Function costs more host time than a whole torch.nn.BatchNorm layer, so a remembered call
// (tritonbn/eager.py) runs here: a torch::autograd::Function whose forward and backward replay *programs*
// that tritonbn/kernels/replay.py recorded from the Python path of the same launch site. A program allocates
// the call's tensors (shapes, strides and dtypes are fixed by the site), then calls each launch's Triton
// launch function (the C function behind the compiled kernel's launcher, see kernels/launch.py) with prepared
// arguments whose slots take this call's data pointers, stream and momentum. Whatever a program cannot run —
// another stream than the one its workspace belongs to, a CUDA graph being captured, a gradient of another
// dtype or alignment, a backward with create_graph, gradients asked in a combination not yet recorded — goes
// to the Python implementation (the call object's fallbacks), which records the missing program (never a
// captured one).

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#if __has_include(<cuda.h>)  // Triton's copy (tritonbn/glue.py puts it on the include path)
#include <cuda.h>
#include <dlfcn.h>
#define TRITONBN_DRIVER_LAUNCH 1
#endif

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// Launches the glue made since the process started: through the driver itself, and through
// Triton's launch function.
std::atomic<int64_t> driver_launches{0}, triton_launches{0};

// What a slot of a launch's argument tuple receives.
enum Slot : int64_t { kPointer = 0, kStream = 1, kMomentum = 2 };

struct Allocation {
  std::vector<int64_t> shape, strides;
  at::ScalarType dtype;
};

// A launch made straight through the driver, as Triton's launcher would make it
// (kernels/replay.py's _driver_launch): the kernel's parameters packed at their offsets, slots
// (parameter, Slot, tensor index) taking this call's pointers and momentum.
struct DriverLaunch {
  uint64_t function;
  std::array<unsigned, 3> grid;
  unsigned block, shared;
  std::vector<unsigned char> packed;
  std::vector<size_t> offsets;
  std::vector<std::array<int64_t, 3>> slots;
};

struct Launch {
  py::object run;                                // Triton's launch function (or the compiled launcher)
  py::tuple args;                                // its arguments, slots included
  std::vector<std::array<int64_t, 3>> slots;     // (position, Slot, tensor index)
  py::object kept;                               // the compiled kernel, and workspaces args points into
  Py_ssize_t nest_from;                          // args from here go as one tuple (-1: all flat)
  std::optional<DriverLaunch> driver;            // the same launch without Python, where it is plain
};

// One pass of a launch site. Tensor indices: the pass's inputs first (forward: x, weight, bias,
// running_mean, running_var, the batch counter; backward: dy, then the saved tensors), then its
// allocations.
struct Program {
  std::vector<Allocation> allocations;
  std::vector<Launch> launches;
  std::vector<int64_t> outputs;  // returned (-1: an undefined tensor)
  std::vector<int64_t> saved;    // forward only: kept for the backward
};

// A tensor as a remembered call knew it: absent, or its dtype and data pointer (a tensor moved,
// cast or reassigned since has another).
struct Identity {
  bool defined = false;
  at::ScalarType dtype = at::ScalarType::Undefined;
  uint64_t data = 0;
  bool operator==(const Identity&) const = default;
};

Identity identity_of(const c10::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return {};
  return {true, tensor->scalar_type(), reinterpret_cast<uint64_t>(tensor->data_ptr())};
}

struct Call : torch::CustomClassHolder {
  // The module's weight, bias, running_mean, running_var and num_batches_tracked when the call
  // was remembered; whether it passes the running statistics and counts the batch.
  std::array<Identity, 5> tensors;
  bool running = true, counts = false;
  // The input's strides and 16-byte alignment when the call was remembered: the programs address
  // the saved input with them, so a backward whose saved input differs (a saved-tensor hook gave
  // it back contiguous, or elsewhere) goes to the Python pass, which lays out a copy.
  std::vector<int64_t> x_strides;
  bool x_aligned = true;
  Program forward;
  std::map<int64_t, Program> backward;  // by (needs bits | dy aligned << 3)
  py::object current_stream;            // () -> the raw handle of the current stream (non-CUDA devices)
  int64_t stream = 0;                   // the stream the programs' workspace belongs to
  py::object fallback_forward;          // (x, w, b, rm, rv, counter, momentum) -> (y, [saved])
  py::object fallback_backward;         // (call, dy, [saved], needs bits) -> [dx, dw, db]

  // The last reference may go with an autograd graph, freed where the GIL is not held; or with
  // the interpreter's own teardown, where the GIL must not be asked for: the Python objects are
  // then left to the interpreter.
  ~Call() override {
    if (interpreter_stopping()) {
      for (Program* program : programs()) {
        for (auto& launch : program->launches) launch.run.release(), launch.args.release(), launch.kept.release();
      }
      current_stream.release(), fallback_forward.release(), fallback_backward.release();
      return;
    }
    py::gil_scoped_acquire gil;
    forward = Program();
    backward.clear();
    current_stream = py::object();
    fallback_forward = py::object();
    fallback_backward = py::object();
  }

 private:
  std::vector<Program*> programs() {
    std::vector<Program*> all{&forward};
    for (auto& [key, program] : backward) all.push_back(&program);
    return all;
  }

  static bool interpreter_stopping() {
#if PY_VERSION_HEX >= 0x030D0000
    return !Py_IsInitialized() || Py_IsFinalizing();
#else
    return !Py_IsInitialized() || _Py_IsFinalizing();
#endif
  }
};

#ifdef TRITONBN_DRIVER_LAUNCH
// The driver's entry points, from the libcuda.so.1 Triton loaded (a process that launched a
// Triton kernel has it); null where there is none.
struct Driver {
  decltype(&cuLaunchKernelEx) launch = nullptr;
  decltype(&cuCtxGetCurrent) current_context = nullptr;
  decltype(&cuGetErrorString) error_string = nullptr;
  decltype(&cuStreamIsCapturing) stream_capturing = nullptr;

  static const Driver& get() {
    static const Driver driver = [] {
      Driver found;
      void* library = dlopen("libcuda.so.1", RTLD_LAZY);
      if (library == nullptr) return found;
      found.launch = reinterpret_cast<decltype(&cuLaunchKernelEx)>(dlsym(library, "cuLaunchKernelEx"));
      found.current_context = reinterpret_cast<decltype(&cuCtxGetCurrent)>(dlsym(library, "cuCtxGetCurrent"));
      found.error_string = reinterpret_cast<decltype(&cuGetErrorString)>(dlsym(library, "cuGetErrorString"));
      found.stream_capturing =
          reinterpret_cast<decltype(&cuStreamIsCapturing)>(dlsym(library, "cuStreamIsCapturing"));
      if (found.current_context == nullptr || found.error_string == nullptr) found.launch = nullptr;
      return found;
    }();
    return driver;
  }
};

// Launches through the driver, as Triton's launch function would: the same configuration, no
// launch attribute (replay.py keeps only such launches), the parameters with this call's values.
// False, with nothing launched, where this thread has no CUDA context yet: Triton's launch
// function, which makes one current, takes that launch.
bool launch_through_driver(const DriverLaunch& launch, const std::vector<at::Tensor>& tensors, int64_t stream,
                           double momentum) {
  if (launch.grid[0] == 0 || launch.grid[1] == 0 || launch.grid[2] == 0) return true;  // Triton skips it too
  const Driver& driver = Driver::get();
  CUcontext context = nullptr;
  if (driver.launch == nullptr || driver.current_context(&context) != CUDA_SUCCESS || context == nullptr) {
    return false;
  }
  constexpr size_t kMaxParameters = 64;
  alignas(16) unsigned char storage[kMaxParameters * 8];
  void* parameters[kMaxParameters];
  std::memcpy(storage, launch.packed.data(), launch.packed.size());
  for (const auto& [parameter, kind, index] : launch.slots) {
    unsigned char* at = storage + launch.offsets[parameter];
    if (kind == kPointer) {
      const uint64_t pointer = reinterpret_cast<uint64_t>(tensors[index].data_ptr());
      std::memcpy(at, &pointer, sizeof pointer);
    } else {
      const float value = static_cast<float>(momentum);
      std::memcpy(at, &value, sizeof value);
    }
  }
  for (size_t i = 0; i < launch.offsets.size(); ++i) parameters[i] = storage + launch.offsets[i];
  CUlaunchConfig config{};
  config.gridDimX = launch.grid[0];
  config.gridDimY = launch.grid[1];
  config.gridDimZ = launch.grid[2];
  config.blockDimX = launch.block;
  config.blockDimY = config.blockDimZ = 1;
  config.sharedMemBytes = launch.shared;
  config.hStream = reinterpret_cast<CUstream>(stream);
  config.attrs = nullptr;
  config.numAttrs = 0;
  // As Triton's launcher does, other threads may run Python while the driver queues the launch.
  PyThreadState* released = PyGILState_Check() ? PyEval_SaveThread() : nullptr;
  const CUresult result = driver.launch(&config, reinterpret_cast<CUfunction>(launch.function), parameters, nullptr);
  if (released != nullptr) PyEval_RestoreThread(released);
  if (result != CUDA_SUCCESS) {
    const char* text = nullptr;
    driver.error_string(result, &text);
    throw std::runtime_error(std::string("tritonbn: cuLaunchKernelEx failed: ") + (text ? text : "unknown error"));
  }
  return true;
}
#endif

std::vector<at::Tensor> run(const Program& program, std::vector<at::Tensor> tensors, const at::Device& device,
                            int64_t stream, double momentum) {
  for (const auto& a : program.allocations) {
    tensors.push_back(at::empty_strided(a.shape, a.strides, at::TensorOptions().dtype(a.dtype).device(device)));
  }
  for (const auto& launch : program.launches) {
#ifdef TRITONBN_DRIVER_LAUNCH
    if (launch.driver && launch_through_driver(*launch.driver, tensors, stream, momentum)) {
      ++driver_launches;
      continue;
    }
#endif
    // The recorded arguments, a slot's taking this call's value; those from nest_from on go in a
    // tuple of their own, the last argument (Triton 3.8's layout).
    const Py_ssize_t n = PyTuple_GET_SIZE(launch.args.ptr());
    const bool nested = launch.nest_from >= 0;
    const Py_ssize_t flat = nested ? launch.nest_from : n;
    py::tuple args(nested ? flat + 1 : n), inner(nested ? n - flat : 0);
    auto place = [&](Py_ssize_t i, PyObject* value) {  // steals value
      PyObject* tuple = i < flat ? args.ptr() : inner.ptr();
      const Py_ssize_t at = i < flat ? i : i - flat;
      Py_XDECREF(PyTuple_GET_ITEM(tuple, at));
      PyTuple_SET_ITEM(tuple, at, value);
    };
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(launch.args.ptr(), i);
      Py_INCREF(item);
      place(i, item);
    }
    for (const auto& [position, kind, index] : launch.slots) {
      PyObject* value;
      if (kind == kStream) {
        value = PyLong_FromLongLong(stream);
      } else if (kind == kMomentum) {
        value = PyFloat_FromDouble(momentum);
      } else {
        value = PyLong_FromUnsignedLongLong(reinterpret_cast<uintptr_t>(tensors[index].data_ptr()));
      }
      if (value == nullptr) throw py::error_already_set();
      place(position, value);
    }
    if (nested) PyTuple_SET_ITEM(args.ptr(), flat, inner.release().ptr());
    PyObject* result = PyObject_Call(launch.run.ptr(), args.ptr(), nullptr);
    if (result == nullptr) throw py::error_already_set();
    Py_DECREF(result);
    ++triton_launches;
  }
  return tensors;
}

Call* call_of(const c10::intrusive_ptr<torch::CustomClassHolder>& holder) { return static_cast<Call*>(holder.get()); }

// The stream Triton launches on: the current CUDA stream of x's device, read in C++; elsewhere
// (a stand-in driver's CPU tensors) whatever the call's reader says.
int64_t current_stream(const Call& call, const at::Tensor& x) {
  if (x.is_cuda()) {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    return reinterpret_cast<int64_t>(impl->getStream(x.device()).native_handle());
  }
  return call.current_stream().cast<int64_t>();
}

// Whether launches on `stream` now go into a CUDA graph being captured (or cannot tell). A program's
// launches use the workspace kept for eager calls (kernels/workspace.py), which a graph must not share: a
// captured call goes to the Python passes, which give the graph workspace of its own and record nothing.
bool capturing(const at::Tensor& x, int64_t stream) {
#ifdef TRITONBN_DRIVER_LAUNCH
  const Driver& driver = Driver::get();
  if (driver.stream_capturing != nullptr) {
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    return driver.stream_capturing(reinterpret_cast<CUstream>(stream), &status) != CUDA_SUCCESS ||
           status != CU_STREAM_CAPTURE_STATUS_NONE;
  }
#endif
  if (!x.is_cuda()) return false;
  // Never destroyed: the interpreter may be gone when static objects are.
  static const py::object* is_capturing =
      new py::object(py::module_::import("torch.cuda").attr("is_current_stream_capturing"));
  return (*is_capturing)().cast<bool>();
}

// Stands for an absent weight or bias among the Function's inputs (autograd inputs must be
// defined tensors); programs never read it.
const at::Tensor& absent() {
  static const at::Tensor tensor = at::empty({0});
  return tensor;
}

at::Tensor or_absent(const c10::optional<at::Tensor>& tensor) { return tensor.has_value() ? *tensor : absent(); }

at::Tensor or_undefined(const at::Tensor& tensor) { return tensor.is_same(absent()) ? at::Tensor() : tensor; }

struct EagerBatchNorm : public torch::autograd::Function<EagerBatchNorm> {
  // weight and bias (or absent()) are the inputs autograd differentiates; the running statistics
  // and the batch counter never need a gradient and pass as plain arguments.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_input,
                            const at::Tensor& bias_input, const c10::optional<at::Tensor>& running_mean_input,
                            const c10::optional<at::Tensor>& running_var_input,
                            const c10::optional<at::Tensor>& counter_input, double momentum,
                            const c10::intrusive_ptr<Call>& call) {
    const at::Tensor weight = or_undefined(weight_input), bias = or_undefined(bias_input);
    const at::Tensor running_mean = running_mean_input.value_or(at::Tensor());
    const at::Tensor running_var = running_var_input.value_or(at::Tensor());
    const at::Tensor counter = counter_input.value_or(at::Tensor());
    py::gil_scoped_acquire gil;
    c10::OptionalDeviceGuard device_guard;  // Triton launches on the current device: x's
    if (x.is_cuda()) device_guard.reset_device(x.device());
    const int64_t stream = current_stream(*call, x);
    at::Tensor y;
    std::vector<at::Tensor> saved;
    if (stream == call->stream && !capturing(x, stream)) {
      auto tensors =
          run(call->forward, {x, weight, bias, running_mean, running_var, counter}, x.device(), stream, momentum);
      y = tensors[call->forward.outputs[0]];
      for (int64_t index : call->forward.saved) saved.push_back(index < 0 ? at::Tensor() : tensors[index]);
    } else {
      auto optional = [](const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
      auto result = call->fallback_forward(x, optional(weight), optional(bias), optional(running_mean),
                                           optional(running_var), optional(counter), momentum)
                        .cast<py::tuple>();
      y = result[0].cast<at::Tensor>();
      for (auto item : result[1].cast<py::list>()) {
        saved.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
      }
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_bias = ctx->needs_input_grad(2);
    variable_list result(8);
    if (!(need_input || need_weight || need_bias)) return result;
    auto saved = ctx->get_saved_variables();
    auto holder = ctx->saved_data["call"].toCapsule();
    Call* call = call_of(holder);
    const at::Tensor& x = saved[0];
    at::Tensor dy = grads[0];
    const int64_t needs = int64_t(need_input) | int64_t(need_weight) << 1 | int64_t(need_bias) << 2;
    py::gil_scoped_acquire gil;
    const bool x_as_recorded = x.strides().equals(call->x_strides) &&
                               (!call->x_aligned || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0);
    if (x_as_recorded && !at::GradMode::is_enabled() && dy.scalar_type() == x.scalar_type()) {
      if (dy.strides() != x.strides()) dy = at::empty_like(x).copy_(dy);
      const bool aligned = reinterpret_cast<uintptr_t>(dy.data_ptr()) % 16 == 0;
      auto found = call->backward.find(needs | int64_t(aligned) << 3);
      c10::OptionalDeviceGuard device_guard;
      if (x.is_cuda()) device_guard.reset_device(x.device());
      const int64_t stream = current_stream(*call, x);
      if (found != call->backward.end() && stream == call->stream && !capturing(x, stream)) {
        std::vector<at::Tensor> inputs{dy};
        inputs.insert(inputs.end(), saved.begin(), saved.end());
        auto tensors = run(found->second, std::move(inputs), x.device(), stream, 0.0);
        for (size_t i = 0; i < 3; ++i) {
          const int64_t index = found->second.outputs[i];
          if (index >= 0) result[i] = tensors[index];
        }
        return result;
      }
    }
    py::list saved_list;
    for (const auto& tensor : saved) {
      saved_list.append(tensor.defined() ? py::cast(tensor) : py::none());
    }
    auto grads_out = call->fallback_backward(py::cast(c10::intrusive_ptr<Call>::reclaim_copy(call)), grads[0],
                                             saved_list, needs)
                         .cast<py::list>();
    for (size_t i = 0; i < 3; ++i) {
      if (!grads_out[i].is_none()) result[i] = grads_out[i].cast<at::Tensor>();
    }
    return result;
  }
};

Program make_program(const py::list& allocations, const py::list& launches, std::vector<int64_t> outputs,
                     std::vector<int64_t> saved) {
  Program program;
  for (auto item : allocations) {
    auto spec = item.cast<py::tuple>();
    program.allocations.push_back(Allocation{spec[0].cast<std::vector<int64_t>>(),
                                             spec[1].cast<std::vector<int64_t>>(),
                                             spec[2].cast<at::ScalarType>()});
  }
  for (auto item : launches) {
    auto spec = item.cast<py::tuple>();
    std::optional<DriverLaunch> driver;
    if (!spec[5].is_none()) {
      auto d = spec[5].cast<py::tuple>();
      auto packed = d[4].cast<std::string>();
      auto offsets = d[5].cast<std::vector<size_t>>();
      auto slots = d[6].cast<std::vector<std::array<int64_t, 3>>>();
      bool valid = offsets.size() <= 64 && packed.size() <= 64 * 8;
      for (size_t offset : offsets) valid = valid && offset + 8 <= packed.size();
      for (const auto& slot : slots) valid = valid && slot[0] >= 0 && size_t(slot[0]) < offsets.size();
      if (!valid) throw py::value_error("a driver launch: at most 64 parameters of 8 bytes, slots among them");
      driver = DriverLaunch{d[0].cast<uint64_t>(),
                            d[1].cast<std::array<unsigned, 3>>(),
                            d[2].cast<unsigned>(),
                            d[3].cast<unsigned>(),
                            std::vector<unsigned char>(packed.begin(), packed.end()),
                            std::move(offsets),
                            std::move(slots)};
    }
    program.launches.push_back(Launch{spec[0], spec[1].cast<py::tuple>(),
                                      spec[2].cast<std::vector<std::array<int64_t, 3>>>(), spec[3],
                                      spec[4].cast<Py_ssize_t>(), std::move(driver)});
  }
  program.outputs = std::move(outputs);
  program.saved = std::move(saved);
  return program;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tritonbn's eager autograd Function in C++: replays recorded launch programs";
  py::class_<Call, c10::intrusive_ptr<Call>>(m, "Call")
      .def(py::init([](py::object current_stream, int64_t stream, py::object fallback_forward,
                       py::object fallback_backward) {
        auto call = c10::make_intrusive<Call>();
        call->current_stream = std::move(current_stream);
        call->stream = stream;
        call->fallback_forward = std::move(fallback_forward);
        call->fallback_backward = std::move(fallback_backward);
        return call;
      }))
      .def("set_tensors",
           [](Call& call, const py::list& tensors, bool running, bool counts) {
             if (tensors.size() != call.tensors.size()) throw py::value_error("set_tensors: five tensors expected");
             for (size_t i = 0; i < call.tensors.size(); ++i) {
               if (tensors[i].is_none()) {
                 call.tensors[i] = Identity{};
               } else {
                 auto pair = tensors[i].cast<py::tuple>();
                 call.tensors[i] = Identity{true, pair[0].cast<at::ScalarType>(), pair[1].cast<uint64_t>()};
               }
             }
             call.running = running;
             call.counts = counts;
           })
      .def("set_input_layout",
           [](Call& call, std::vector<int64_t> strides, bool aligned) {
             call.x_strides = std::move(strides);
             call.x_aligned = aligned;
           })
      .def("set_forward",
           [](Call& call, py::list allocations, py::list launches, std::vector<int64_t> outputs,
              std::vector<int64_t> saved) { call.forward = make_program(allocations, launches, outputs, saved); })
      .def("set_backward", [](Call& call, int64_t key, py::list allocations, py::list launches,
                              std::vector<int64_t> outputs) {
        call.backward[key] = make_program(allocations, launches, outputs, {});
      })
      .def_readonly("stream", &Call::stream);
  m.def(
      "launch_counts",
      [] {
        return std::map<std::string, int64_t>{{"driver", driver_launches.load()}, {"triton", triton_launches.load()}};
      },
      "launches the glue made since the process started: through the driver itself, through Triton's launch function");
  m.def(
      "batch_norm",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
         const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
         double momentum, const c10::intrusive_ptr<Call>& call,
         const c10::optional<at::Tensor>& counter) -> py::object {
        const std::array<Identity, 5> found{identity_of(weight), identity_of(bias), identity_of(running_mean),
                                            identity_of(running_var), identity_of(counter)};
        if (found != call->tensors) return py::none();
        const c10::optional<at::Tensor> none;
        return py::cast(EagerBatchNorm::apply(x, or_absent(weight), or_absent(bias),
                                              call->running ? running_mean : none, call->running ? running_var : none,
                                              call->counts ? counter : none, momentum, call));
      },
      "y = batch_norm(x) through a recorded call of the module whose parameters and buffers these are (the "
      "counter, num_batches_tracked, counted by the first kernel when the call counts), or None when they are "
      "not the call's");
}
